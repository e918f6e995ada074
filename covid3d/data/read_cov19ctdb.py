"""COV19-CT-DB reader: one folder of JPEG slices per scan.

Layout under the dataset root:

  train/covid/ct_scan_N/0.jpg 1.jpg ...   (detection label 1)
  train/non-covid/ct_scan_N/...           (detection label 0)
  validation/covid/... validation/non-covid/...
  test/ct_scan_N/...                      (no labels)
  train_partition_covid_categories.csv    severity of (some) covid scans
  val_partition_covid_categories.csv

Class folders may also be spelled 'non_covid' / 'noncovid' (case-insensitive);
scan ids are '<covid|non-covid>/<folder>' in labelled partitions (folder names
repeat across the two classes in the real data) and '<folder>' elsewhere.
Slices are ordered by the integer value of their file stem (2.jpg before
10.jpg); extensions match in any case (.JPG). Two files of one number (1.jpg
and 01.jpg): the one without leading zeros is used (else the first by name),
the other is a 'slice' skip naming both. Files that are not
'<integer>.jpg|.jpeg|.png' (.DS_Store, Thumbs.db, notes) are logged and
ignored in every mode. A scan folder directly in train/ or validation/ (no
class folder) is kept without a covid label and reported ('label' note). A
scan folder that cannot be read (permissions, I/O error) is that scan's skip;
an unreadable partition or class folder is a DataError in every mode.

Severity CSV: found as <root>/<name> or <root>/<partition>/<name> for the
names in SEVERITY_CSVS (or given explicitly); ',' ';' or tab separated; the
scan column may be called Name, ct_scan_name, scan, scan_id, id; the label
column Category, severity, label, class; categories 1..4 (mild, moderate,
severe, critical) become 0..3. A covid scan missing from the CSV gets
severity -1 (unknown; the real severity subset is smaller than the covid
set); a CSV row naming no existing covid scan, or with no valid category, is
a bad-input case.

Slices whose in-plane size differs from the scan's most common size are
dropped (logged by file name, never fatal), as in the paper.

The root may be a bucket URL (``gs://...``; `read_common.data_path`): a scan's
slices are then fetched together, as concurrent requests, before decoding.
"""
import collections
import io
from pathlib import Path

import numpy as np

from covid3d import storage
from covid3d.data import headers, read_common
from covid3d.data import scan as scan_lib
from covid3d.data.skips import SkipLog, note, reject

PARTITION_DIRS = {"train": ("train",), "validation": ("validation", "val", "valid"),
                  "test": ("test",)}
CLASS_DIRS = {"covid": 1, "non-covid": 0, "non_covid": 0, "noncovid": 0}
SEVERITY_CSVS = {
    "train": ("train_partition_covid_categories.csv", "train_severity.csv"),
    "validation": ("val_partition_covid_categories.csv",
                   "validation_partition_covid_categories.csv", "validation_severity.csv",
                   "val_severity.csv"),
    "test": (),
}
SEVERITY_COLUMNS = {"name": ("name", "ctscanname", "scan", "scanname", "scanid", "id"),
                    "category": ("category", "severity", "label", "class")}
SLICE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _class_name(label: int) -> str:
  return "covid" if label else "non-covid"


def list_slices(folder: Path, skips: SkipLog | None, *, strict: bool = False) -> list[Path]:
  """Slice files of one scan folder in numeric order; stray files logged.

  Two files of one slice number (`1.jpg`, `01.jpg`, `1.png`): the one whose
  stem has no leading zeros is used, else the first by file name; each other
  one is rejected as a 'slice' skip naming both.

  Raises:
    OSError: when the folder cannot be read (the caller skips the scan).
  """
  by_number = collections.defaultdict(list)
  for p, kind in read_common.entries(folder):
    if (kind == "file" and p.suffix.lower() in SLICE_SUFFIXES and p.stem.isascii()
        and p.stem.isdigit()):
      by_number[int(p.stem)].append(p)
    else:
      read_common.stray(p, skips, "an <integer>.jpg slice")
  out = []
  for number, paths in sorted(by_number.items()):
    paths.sort(key=lambda p, n=number: (p.stem != str(n), p.name))
    for other in paths[1:]:
      reject(other, f"slice number {number} twice: {paths[0].name} and {other.name} "
             f"(the folder {folder}); {paths[0].name} is used", strict=strict, skips=skips,
             what="slice")
    out.append(paths[0])
  return out


def find_severity_csv(root: Path, partition: str) -> Path | None:
  """The severity CSV of a partition, or None if there is none."""
  for name in SEVERITY_CSVS[partition]:
    for folder in (root, root / partition):
      if (folder / name).is_file():
        return folder / name
  return None


def list_cov19ctdb(root, partition: str, *, severity_csv=None, strict: bool = False,
                   skips: SkipLog | None = None) -> list[scan_lib.ScanRef]:
  """Lists the scans of one partition (opens no image).

  Args:
    root: dataset root (module doc).
    partition: 'train', 'validation' or 'test'.
    severity_csv: severity CSV path; None: looked up (module doc).
    strict: raise DataError on bad input instead of logging a skip.
    skips: where skips are recorded (tagged 'cov19ctdb' and `partition`),
      and the number of scan folders found (`SkipLog.count_offered`).

  Returns:
    ScanRefs sorted by scan id; `paths` are the slice files in order.

  Raises:
    DataError: missing or unreadable partition or class folder, malformed CSV
      header (any mode); in strict mode any bad input.
  """
  skips = SkipLog() if skips is None else skips  # (a private one still logs)
  with skips.scope("cov19ctdb", partition):
    return _list(read_common.data_path(root), partition, severity_csv, strict, skips)


def _list(root: Path, partition: str, severity_csv, strict: bool, skips: SkipLog):
  part = read_common.partition_dir(root, partition, PARTITION_DIRS, flat_ok=False)
  labelled = partition != "test"
  folders = []  # (scan_id, folder, labels)
  for entry, kind in read_common.dataset_folder_entries(part, "partition folder"):
    if kind != "dir":
      read_common.stray(entry, skips, "a scan or class folder")
    elif entry.name.lower() in CLASS_DIRS:
      label = CLASS_DIRS[entry.name.lower()]
      for sub, sub_kind in read_common.dataset_folder_entries(entry, "class folder"):
        if sub_kind == "dir":
          folders.append((f"{_class_name(label)}/{sub.name}", sub, {"covid": label}))
        else:
          read_common.stray(sub, skips, "a scan folder")
    else:
      if labelled:
        note(entry, "no class folder (covid/, non-covid/): the scan has no covid label; kept "
             "unlabelled, so the covid and severity tasks leave it out", skips=skips,
             what="label")
      folders.append((entry.name, entry, {}))
  skips.count_offered("cov19ctdb", partition, len(folders))
  refs, rejected = [], set()
  for scan_id, folder, labels in folders:
    try:
      slices = list_slices(folder, skips, strict=strict)
    except OSError as e:
      reject(folder, f"unreadable scan folder: {read_common.os_reason(e, folder)}",
             strict=strict, skips=skips)
      rejected.add(folder.name)
      continue
    if len(slices) < read_common.MIN_SLICES:
      reject(folder, f'{"empty scan folder: no" if not slices else "only one"} image slice '
             f'(a scan needs at least {read_common.MIN_SLICES})', strict=strict, skips=skips)
      rejected.add(folder.name)
      continue
    refs.append(scan_lib.ScanRef("cov19ctdb", scan_id, tuple(map(str, slices)), labels,
                                 partition))
  refs = read_common.unique_ids(refs, strict=strict, skips=skips)
  csv_path = (read_common.data_path(severity_csv) if severity_csv
              else find_severity_csv(root, partition))
  if csv_path is not None:
    refs = _add_severity(refs, csv_path, strict=strict, skips=skips, rejected=rejected)
  return sorted(refs, key=lambda r: r.scan_id)


def _add_severity(refs, csv_path: Path, *, strict, skips, rejected=frozenset()):
  """Refs with 'severity' labels from the CSV (matched by folder name).

  `rejected`: names of scan folders skipped by the listing (their rows say so).
  """
  rows = read_common.read_label_csv(csv_path, SEVERITY_COLUMNS)
  by_name = collections.defaultdict(list)
  for i, ref in enumerate(refs):
    by_name[Path(ref.paths[0]).parent.name].append(i)
  out = list(refs)
  for name, (line, row) in read_common.first_rows(rows, csv_path, strict=strict,
                                                  skips=skips).items():
    where = f"{csv_path}:{line}"
    # Severity is only defined for covid (or unlabelled) scans.
    hits = [i for i in by_name.get(name, ()) if refs[i].labels.get("covid", 1) == 1]
    if not hits:
      reject(where, f"names scan {name!r}, which was skipped (see its scan entry)"
             if name in rejected and name not in by_name else
             f"names scan {name!r}, which is not a covid scan folder of this partition",
             strict=strict, skips=skips, what="label")
      continue
    category = row["category"]
    if category not in ("1", "2", "3", "4"):
      reject(where, f"scan {name!r} has no valid severity category ({category!r}; expected 1..4)",
             strict=strict, skips=skips, what="label")
      continue
    ref = refs[hits[0]]
    out[hits[0]] = scan_lib.ScanRef(ref.dataset, ref.scan_id, ref.paths,
                                    {**ref.labels, "severity": int(category) - 1},
                                    ref.partition, ref.mask_path)
  return out


def load_cov19ctdb(ref: scan_lib.ScanRef, *, strict: bool = False,
                   skips: SkipLog | None = None,
                   max_voxels: int = headers.MAX_VOXELS) -> scan_lib.Scan | None:
  """Reads a JPEG slice folder into a Scan (None: rejected, reason in `skips`).

  Slices are read as 8-bit gray (the real data stores gray as RGB; the JPEG
  luma channel is decoded directly) and scaled 0..255 -> [0, 1]. Their sizes
  come from the image headers first: a scan of more than ``max_voxels`` voxels
  is rejected before any slice is decoded.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = read_common.data_path(ref.paths[0]).parent
  fetched = (dict(zip(ref.paths, storage.read_many(ref.paths), strict=True))
             if storage.is_remote(ref.paths[0]) else None)
  sizes = {}
  for p in ref.paths:
    try:
      with Image.open(_slice_file(p, fetched)) as im:
        sizes[p] = im.size[::-1]
    except Exception as e:  # pylint: disable=broad-except  # any decoder error = bad slice
      reject(p, f"unreadable image: {type(e).__name__}: {e}", strict=strict, skips=skips,
             what="slice")
  if not sizes:
    reject(folder, "no readable slice", strict=strict, skips=skips)
    return None
  majority, count = collections.Counter(sizes.values()).most_common(1)[0]
  try:
    headers.check_voxels(count * majority[0] * majority[1], max_voxels,
                         f"{count} slices of {majority[1]}x{majority[0]}")
  except headers.Refused as e:
    reject(folder, str(e), strict=strict, skips=skips)
    return None
  slices, names = [], []
  for p, size in sizes.items():
    if size != majority:
      note(p, f"in-plane size {size[0]}x{size[1]} differs from the scan majority "
           f"{majority[0]}x{majority[1]}; slice dropped", skips=skips, what="slice")
      continue
    try:
      slices.append(_read_gray(_slice_file(p, fetched)))
      names.append(Path(p).name)
    except Exception as e:  # pylint: disable=broad-except  # truncated/corrupt data
      reject(p, f"corrupt or truncated image: {type(e).__name__}: {e}", strict=strict,
             skips=skips, what="slice")
  if len(slices) < read_common.MIN_SLICES:
    reject(folder, f"{len(slices)} usable slice(s) left (a scan needs at least "
           f"{read_common.MIN_SLICES})", strict=strict, skips=skips)
    return None
  volume = np.stack(slices).astype(np.float32)
  volume /= 255
  meta = {**scan_lib.identity_meta(volume.shape), "slices": names}
  mask = None
  if ref.mask_path is not None:
    mask = read_common.load_mask(ref, volume.shape, strict=strict, skips=skips)
    if mask is None:
      return None
  return scan_lib.Scan(scan_id=ref.scan_id, volume=volume, spacing=(1., 1., 1.),
                       origin=(0., 0., 0.), direction=np.eye(3), labels=dict(ref.labels),
                       mask=mask, source=str(folder), meta=meta)


def _slice_file(path: str, fetched: dict | None):
  """What PIL opens for a slice: its local path, or its fetched bytes as a file.

  Raises:
    Exception: the error that fetching the object raised.
  """
  if fetched is None:
    return path
  data = fetched[path]
  if isinstance(data, BaseException):
    raise data
  return io.BytesIO(data)


def _read_gray(path) -> np.ndarray:
  """uint8 (H, W) gray slice (``path``: a file name or a binary file); RGB JPEGs decode
  only their luma channel."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    if im.format == "JPEG" and im.mode in ("RGB", "YCbCr"):
      im.draft("L", im.size)
    return np.asarray(im.convert("L"))
