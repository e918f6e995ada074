"""STOIC reader: `data/mha/<PatientID>.mha` + `metadata/reference.csv` (SimpleITK).

A patient's volume may instead be a folder `data/mha/<PatientID>/` holding its
DICOM series (hospital exports; `covid3d.data.read_dicom`).

reference.csv columns PatientID, probCOVID, probSevere (0/1 in the public
training set; names matched case-insensitively, '_'/'-'/spaces ignored) become
the labels 'stoic_covid' and 'stoic_severe'. The partition is 'train' (the
only public one). Volumes: Hounsfield units clipped to [-1000, 500] -> [0, 1],
canonical (D, H, W) LPS layout.
"""
from pathlib import Path

from covid3d.data import read_common
from covid3d.data import scan as scan_lib
from covid3d.data.skips import DataError, SkipLog, reject

REFERENCE = Path("metadata") / "reference.csv"
MHA_DIR = Path("data") / "mha"
COLUMNS = {"name": ("patientid", "patient", "id"),
           "covid": ("probcovid", "covid"),
           "severe": ("probsevere", "severe")}


def list_stoic(root, partition: str = "train", *, strict: bool = False,
               skips: SkipLog | None = None) -> list[scan_lib.ScanRef]:
  """Lists the labelled STOIC scans, sorted by PatientID.

  `.mha` is matched in any case. Two files of one patient (`110.mha` and
  `110.MHA`) are a duplicate scan id: the one with a readable header is
  used, then the one with a lower-case extension (`read_common.best_first`);
  the other is a 'scan' skip. A volume whose reference.csv row has no valid
  label is skipped too ('scan', besides the row's 'label' skip).

  Raises:
    DataError: if data/mha or metadata/reference.csv is missing, or data/mha
      cannot be read (any mode); in strict mode any bad input.
  """
  skips = SkipLog() if skips is None else skips  # (a private one still logs)
  with skips.scope("stoic", partition):
    return _list(read_common.data_path(root), partition, strict, skips)


def _list(root: Path, partition: str, strict: bool, skips: SkipLog):
  if not (root / MHA_DIR).is_dir():
    raise DataError(root / MHA_DIR, "STOIC volume folder not found")
  if not (root / REFERENCE).is_file():
    raise DataError(root / REFERENCE, "STOIC label file not found")
  files = {}
  for p, kind in read_common.dataset_folder_entries(root / MHA_DIR, "STOIC volume folder"):
    if kind == "file" and p.suffix.lower() == ".mha":
      files.setdefault(p.stem, []).append(p)
    elif kind == "dir":   # a DICOM series
      files.setdefault(p.name, []).append(p)
    else:
      read_common.stray(p, skips, "a <PatientID>.mha volume or <PatientID>/ DICOM folder")
  skips.count_offered("stoic", partition, sum(map(len, files.values())))
  csv_path = root / REFERENCE
  rows = read_common.first_rows(read_common.read_label_csv(csv_path, COLUMNS), csv_path,
                                strict=strict, skips=skips)
  refs, notes = [], {}
  for name, (line, row) in rows.items():
    where = f"{csv_path}:{line}"
    if name not in files:
      reject(where, f'names patient {name!r}, but {root / MHA_DIR / (name + ".mha")} does '
             'not exist', strict=strict, skips=skips, what="label")
      continue
    try:
      labels = {"stoic_covid": _binary(row["covid"]), "stoic_severe": _binary(row["severe"])}
    except ValueError as e:
      reject(where, f"patient {name!r}: {e}", strict=strict, skips=skips, what="label")
      for p in files[name]:
        reject(p, f"no valid label: its row in {csv_path} (line {line}) was rejected: {e}",
               strict=strict, skips=skips)
      continue
    paths, why = read_common.best_first(files[name])
    notes.update(why)
    refs.extend(scan_lib.ScanRef("stoic", name, (str(p),), labels, partition) for p in paths)
  for name, paths in files.items():
    if name not in rows:
      for p in paths:
        reject(p, f"no label: patient {name!r} has no row in {csv_path}", strict=strict,
               skips=skips)
  return sorted(read_common.unique_ids(refs, strict=strict, skips=skips, notes=notes),
                key=lambda r: r.scan_id)


def _binary(text: str) -> int:
  try:
    value = float(text)
  except ValueError:
    raise ValueError(f"label {text!r} is not a number") from None
  if value not in (0.0, 1.0):
    raise ValueError(f"label {text!r} is not 0 or 1")
  return int(value)

