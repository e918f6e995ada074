"""Helpers shared by the dataset readers: folders, label CSVs, volume files, HU scaling.

A dataset root may be a local folder or a bucket URL (``gs://...``): `data_path`
gives a local path as the ``pathlib.Path`` it always was and a URL as an epath,
and the readers use only what both offer. On a bucket, `entries` lists a
folder with one request, NIfTI volumes are read from the object's bytes, and
other volume files (SimpleITK) from a temporary local copy.
"""
import contextlib
import csv
import errno
import logging
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np

from covid3d import storage
from covid3d.data import headers, read_dicom
from covid3d.data import scan as scan_lib
from covid3d.data.headers import MAX_VOXELS, Refused
from covid3d.data.skips import DataError, SkipLog, note, reject

log = logging.getLogger(__name__)

HU_WINDOW = (-1000.0, 500.0)
MIN_SLICES = 2  # fewer slices make no volume (and no cubic spline)
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)  # as pathlib's is_dir
DICOM_SUFFIXES = (".dcm", ".dicom")


def data_path(path):
  """A dataset path: ``pathlib.Path`` when local (unchanged), ``epath.Path`` for a URL."""
  return storage.as_path(path) if storage.is_remote(path) else Path(path)


def partition_dir(root: Path, partition: str, names: dict, *, flat_ok: bool) -> Path:
  """The folder of `partition` under `root`.

  Args:
    root: dataset root.
    partition: a key of `names`.
    names: partition -> accepted folder names, tried in order.
    flat_ok: return `root` itself when it has none of the partition folders.

  Raises:
    ValueError: unknown partition. DataError: the folder is missing.
  """
  if partition not in names:
    raise ValueError(f"partition {partition!r} not in {tuple(names)}")
  for d in names[partition]:
    if (root / d).is_dir():
      return root / d
  if flat_ok and not any((root / d).is_dir() for ds in names.values() for d in ds):
    return root
  raise DataError(root / partition, f"partition folder not found (tried {names[partition]})")


def entries(folder: Path) -> list[tuple[Path, str]]:
  """[(path, 'dir' | 'file' | 'other')] of a folder, sorted by name.

  A folder in a bucket is listed with one request (`storage.list_folder`);
  it has only 'dir' and 'file' entries.

  Raises:
    OSError: (e.g. PermissionError) when the folder or an entry's type
      cannot be read.
  """
  if storage.is_remote(folder):
    return storage.list_folder(folder)
  out = []
  for p in sorted(folder.iterdir()):
    try:
      mode = os.stat(p).st_mode  # follows links, like Path.is_dir
    except OSError as e:
      if e.errno not in _GONE:  # e.g. EACCES: raised (Path.is_dir would say False)
        raise
      mode = 0  # a broken link: 'other'
    out.append((p, "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"))
  return out


def dataset_folder_entries(folder: Path, what: str) -> list[tuple[Path, str]]:
  """`entries` of a folder that holds many scans (partition, class folder).

  Raises:
    DataError: when it cannot be read (any mode: the listing of the whole
      partition would be incomplete).
  """
  try:
    return entries(folder)
  except OSError as e:
    raise DataError(folder, f"unreadable {what}: {e.strerror or e}") from e


def os_reason(e: OSError, path=None) -> str:
  """'Permission denied' (+ ': <file>' when that is not `path`) of an OSError."""
  text = e.strerror or str(e)
  return f"{text}: {e.filename}" if e.filename and str(e.filename) != str(path) else text


def stray(path, skips: SkipLog | None, expected: str) -> None:
  """Logs (never fails on) a file that is not part of the dataset layout."""
  note(path, f"not {expected}; ignored", skips=skips, what="file")


def read_label_csv(path, columns: dict[str, tuple[str, ...]]) -> list[tuple[int, dict]]:
  """Rows of a label CSV with tolerant column names.

  The delimiter (',', ';' or tab) is sniffed; header names are matched
  case-insensitively, ignoring spaces, '-' and '_'.

  Args:
    path: the CSV file.
    columns: our name -> accepted header names (normalised: lower case, no
      spaces/'-'/'_'), e.g. {'name': ('name', 'ctscanname'), ...}.

  Returns:
    [(line number, {our name: stripped cell text})] for the non-empty rows.

  Raises:
    DataError: for an unreadable file or a missing column (always: the
      labels of the whole dataset depend on it).
  """
  try:
    text = data_path(path).read_bytes().decode("utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(path, f"unreadable label CSV: {e}") from e
  lines = text.splitlines()
  if not lines:
    raise DataError(path, "empty label CSV (no header)")
  delimiter = max(",;\t", key=lines[0].count)
  rows = list(csv.reader(lines, delimiter=delimiter))
  header = [_norm(h) for h in rows[0]]
  where = {}
  for ours, accepted in columns.items():
    hits = [i for i, h in enumerate(header) if h in accepted]
    if not hits:
      raise DataError(path, f"no {ours!r} column: header {rows[0]} has none of {accepted}")
    where[ours] = hits[0]
  out = []
  for line, row in enumerate(rows[1:], start=2):
    if not any(c.strip() for c in row):
      continue
    out.append((line, {k: (row[i].strip() if i < len(row) else "") for k, i in where.items()}))
  return out


def _norm(header: str) -> str:
  return header.strip().lower().replace(" ", "").replace("_", "").replace("-", "")


def first_rows(rows, csv_path, *, strict, skips) -> dict[str, tuple[int, dict]]:
  """{row['name']: (line, row)} keeping the first row of each name.

  Rows with an empty name and later duplicates are rejected ('label' skips).
  """
  seen = {}
  for line, row in rows:
    if not row["name"]:
      reject(f"{csv_path}:{line}", "row without a scan name", strict=strict, skips=skips,
             what="label")
    elif row["name"] in seen:
      reject(f"{csv_path}:{line}", f'duplicate row for scan {row["name"]!r} '
             f'(first at line {seen[row["name"]][0]}; that one is used)',
             strict=strict, skips=skips, what="label")
    else:
      seen[row["name"]] = (line, row)
  return seen


def unique_ids(refs, *, strict, skips, notes=None) -> list:
  """`refs` without later duplicates of a (dataset, partition, scan_id).

  Args:
    notes: {path: text} added to the reason of a dropped duplicate.
  """
  notes = notes or {}
  first, out = {}, []
  for ref in refs:
    key = (ref.dataset, ref.partition, ref.scan_id)
    if key in first:
      extra = f"; {notes[ref.paths[0]]}" if ref.paths[0] in notes else ""
      reason = (f"duplicate scan id {ref.scan_id!r} (also {first[key].paths[0]}; "
                f"that one is used{extra})")
      if skips is None:
        reject(ref.paths[0], reason, strict=strict, skips=skips)
      else:
        with skips.scope(ref.dataset, ref.partition):
          reject(ref.paths[0], reason, strict=strict, skips=skips)
    else:
      first[key] = ref
      out.append(ref)
  return out


def lower_case_extension(path) -> bool:
  """Whether the file's extension(s) are lower case ('.mha', not '.MHA')."""
  ext = "".join(Path(path).suffixes)
  return ext == ext.lower()


def header_error(path) -> str | None:
  """None if the image header of a volume file reads, else the error (one line).

  Cheap (no voxel data read); used to choose between two files of one scan.
  """
  try:
    if data_path(path).is_dir():   # a DICOM series: its files are checked when read
      return None
    if scan_lib.is_nifti(path):
      load_nifti(path)
    else:
      with local_file(path) as local:
        scan_lib.sitk_reader(local).ReadImageInformation()
  except Exception as e:  # pylint: disable=broad-except  # any library error = bad file
    return f"{type(e).__name__}: {e}"
  return None


def best_first(paths) -> tuple[list, dict]:
  """Files naming one scan ordered best first, with notes on the others.

  Order: a readable header before an unreadable one, then a lower-case
  extension before another case, then file name. With one file, no header is
  read.

  Returns:
    (paths best first, {str(path): why it is not the first} for the rest).
  """
  paths = list(paths)
  if len(paths) < 2:
    return paths, {}
  errors = {p: header_error(p) for p in paths}
  ranked = sorted(paths, key=lambda p: (errors[p] is not None, not lower_case_extension(p),
                                        Path(p).name))
  notes = {str(p): f"its image header is unreadable: {errors[p]}" for p in ranked[1:]
           if errors[p] is not None}
  return ranked, notes


def load_nifti(path, max_voxels: int = MAX_VOXELS):
  """A nibabel image of a NIfTI file, its size and data checked from the header first
  (`headers.check_nifti`): ``nib.load`` locally, the object's bytes from a bucket.

  Raises:
    Refused: too many voxels, or less data than the header describes.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  if not storage.is_remote(path):
    headers.check_nifti(path, max_voxels)
    return nib.load(str(path))
  data = headers.bounded_nifti_bytes(data_path(path).read_bytes(), max_voxels)
  return (nib.Nifti2Image if headers.is_nifti2(data) else nib.Nifti1Image).from_bytes(data)


def local_file(path):
  """A context giving a local path of ``path``: itself, or a temporary copy of a URL's file
  or folder (`storage.local_copy`), for SimpleITK, which reads only local files."""
  return storage.local_copy(path) if storage.is_remote(path) else contextlib.nullcontext(path)


def is_dicom_file(path) -> bool:
  """A ``.dcm``/``.dicom`` name, or a file with DICOM's ``DICM`` marker at byte 128."""
  if str(path).lower().endswith(DICOM_SUFFIXES):
    return True
  if scan_lib.is_nifti(path) or str(path).lower().endswith(tuple(scan_lib.SITK_IMAGE_IOS)):
    return False
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:] == b"DICM"
  except OSError:
    return False


def read_sitk(path, max_voxels: int):
  """A SimpleITK image file (MetaImage, NRRD, ...), its data files (`headers.check_data_files`)
  and size (from ``ReadImageInformation``) checked before any voxel is read."""
  if str(path).lower().endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
    headers.check_data_files(path)
  reader = scan_lib.sitk_reader(path)
  reader.ReadImageInformation()
  size = reader.GetSize()
  headers.check_voxels(int(np.prod(size)) * reader.GetNumberOfComponents(), max_voxels,
                       "x".join(map(str, size)))
  return reader.Execute()


def read_volume(path, max_voxels: int = MAX_VOXELS):
  """Reads a 3-D NIfTI (nibabel), another SimpleITK image file, or DICOM (a series folder or
  one file, `covid3d.data.read_dicom`), each checked from its header first (`headers`).

  The file format comes from the extension in any case ('.MHA' is MetaImage);
  a folder is read as a DICOM series. ``path`` may be a URL (`load_nifti`,
  `local_file`); a MetaImage or NRRD header whose voxels are in a separate file
  (.mhd + .raw) is read only from a local folder.

  Returns:
    (float32 array (I, J, K) in file voxel order, (4, 4) RAS affine, info: DICOM's
    ``modality``, ``resampled`` (`read_dicom.read_dicom`); {} for other files).

  Raises:
    Refused: the reason a file is refused from its header (size, data files, DICOM geometry).
    Exception: whatever the library raises for a bad file; ValueError if not 3-D.
  """
  info = {}
  if scan_lib.is_nifti(path):
    img = load_nifti(path, max_voxels)
    data, affine = img.get_fdata(dtype=np.float32), img.affine
  else:
    import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
    with local_file(path) as local:
      if Path(local).is_dir() or is_dicom_file(local):
        files = ([p for p, kind in entries(Path(local)) if kind == "file"]
                 if Path(local).is_dir() else [Path(local)])
        data, affine, info = read_dicom.read_dicom(local, files, max_voxels)
      else:
        img = read_sitk(local, max_voxels)
        data = sitk.GetArrayFromImage(img).astype(np.float32, copy=False).T
        affine = scan_lib.itk_to_ras_affine(img.GetSpacing(), img.GetOrigin(),
                                            img.GetDirection())
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise ValueError(f"expected a 3-D image, got shape {data.shape}")
  return data, affine, info


def load_volume(path, *, strict, skips, max_voxels: int = MAX_VOXELS):
  """`read_volume` + canonical layout + a finite check; None when rejected.

  Returns:
    (float32 (D, H, W) in file units, spacing (z, y, x), meta (with `read_volume`'s info))
    or None.
  """
  try:
    data, affine, info = read_volume(path, max_voxels)
  except Refused as e:
    reject(path, str(e), strict=strict, skips=skips)
    return None
  except Exception as e:  # pylint: disable=broad-except  # any library error = bad file
    reject(path, f"unreadable or truncated image: {type(e).__name__}: {e}",
           strict=strict, skips=skips)
    return None
  bad = data.size - int(np.count_nonzero(np.isfinite(data)))
  if bad:
    reject(path, f"{bad} NaN or infinite voxels", strict=strict, skips=skips)
    return None
  if min(data.shape) < MIN_SLICES:
    reject(path, f"shape {data.shape}: a volume needs at least {MIN_SLICES} voxels per axis",
           strict=strict, skips=skips)
    return None
  volume, spacing, meta = scan_lib.to_canonical(data, affine)
  return volume, spacing, {**meta, **info}


def hu_to_unit(volume_hu: np.ndarray) -> np.ndarray:
  """Clips Hounsfield units to [-1000, 500] and maps them to [0, 1] (float32)."""
  lo, hi = HU_WINDOW
  return ((np.clip(volume_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def load_mask(ref, shape, *, strict, skips):
  """The ref's lesion mask as uint8 (D, H, W) checked against `shape`; None if bad."""
  loaded = load_volume(ref.mask_path, strict=strict, skips=skips)
  if loaded is None:
    return None
  mask = loaded[0]
  if mask.shape != tuple(shape):
    reject(ref.mask_path, f"mask shape {mask.shape} differs from the scan shape {tuple(shape)}",
           strict=strict, skips=skips)
    return None
  if mask.min() < 0 or mask.max() > 255 or not np.array_equal(mask, np.round(mask)):
    reject(ref.mask_path, "mask values are not integers in 0..255", strict=strict, skips=skips)
    return None
  return mask.astype(np.uint8)


def load_hu_scan(ref, *, strict: bool = False, skips: SkipLog | None = None,
                 max_voxels: int = MAX_VOXELS):
  """Scan of a HU volume file `ref.paths[0]` (+ its mask), or None when rejected.

  Used for the lesion set (NIfTI) and STOIC (MHA); ``max_voxels``: `headers.check_voxels`.
  """
  path = ref.paths[0]
  loaded = load_volume(path, strict=strict, skips=skips, max_voxels=max_voxels)
  if loaded is None:
    return None
  volume, spacing, meta = loaded
  mask = None
  if ref.mask_path is not None:
    mask = load_mask(ref, volume.shape, strict=strict, skips=skips)
    if mask is None:
      return None
  _, origin, direction = scan_lib.ras_affine_to_itk(meta["affine_ras"])
  return scan_lib.Scan(scan_id=ref.scan_id, volume=hu_to_unit(volume), spacing=spacing,
                       origin=origin, direction=direction, labels=dict(ref.labels),
                       mask=mask, source=str(path), meta=meta)


# An ITK/GDCM message: "WARNING: In /its/build/path/file.hxx, line 502", then the object
# and its address, "ImageSeriesReader (0x5615...): ", then the text, up to a blank line.
_ITK_MESSAGE = re.compile(r"(WARNING|ERROR): In \S+, line \d+\n(\w+) \(0x[0-9a-f]+\): (.*?)"
                          r"(?:\n\s*\n|\Z)", re.DOTALL)


@contextlib.contextmanager
def library_messages(where):
  """Runs the block with the process's stderr (file descriptor 2) taken aside: each
  message ITK prints there (SimpleITK's readers: "Non uniform sampling", ...) is
  logged as one warning, ``<where>: ITK: <object>: <text>``, without its build
  path; any other text is passed on unchanged."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as aside:
    os.dup2(aside.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      aside.seek(0)
      text = aside.read().decode("utf-8", "replace")
      for kind, source, message in _ITK_MESSAGE.findall(text):
        log.warning("%s: ITK%s: %s: %s", where, "" if kind == "WARNING" else " error", source,
                    " ".join(message.split()))
      rest = _ITK_MESSAGE.sub("", text)
      if rest.strip():
        sys.stderr.write(rest)
