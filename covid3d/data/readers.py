"""Readers of the three datasets: list scans (`DATASETS`), load one (`load_scan`).

  refs = readers.list_cov19ctdb('/data/cov19ctdb', 'train', skips=skips)
  scan = readers.load_scan(refs[0], skips=skips)  # Scan, or None if rejected
  scan = readers.read_path('/scans/patient7/')     # any one scan a user names

Roots and paths may be local or bucket URLs (``gs://...``; `read_common.data_path`).
Formats, label CSVs and tolerated variants: `read_cov19ctdb`, `read_lesions`,
`read_stoic`. Axis convention and writing masks back: `covid3d.data.scan`.
Bad input raises `DataError` with `strict=True`, else is logged and recorded in
`skips` (`covid3d.data.skips`), tagged with the dataset and partition; the
listings also count the scans they found there (the ledger,
`covid3d.data.ledger`). One SkipLog may collect every dataset and partition.
"""
from covid3d.data import read_common
from covid3d.data.headers import MAX_VOXELS
from covid3d.data.read_common import load_hu_scan
from covid3d.data.read_cov19ctdb import (SLICE_SUFFIXES, list_cov19ctdb, list_slices,
                                         load_cov19ctdb)
from covid3d.data.read_lesions import list_lesions
from covid3d.data.read_stoic import list_stoic
from covid3d.data.scan import Scan, ScanRef, write_image_like, write_mask_like
from covid3d.data.skips import DataError, SkipLog, reject

__all__ = ["DATASETS", "DataError", "Scan", "ScanRef", "SkipLog", "list_cov19ctdb",
           "list_lesions", "list_stoic", "load_scan", "read_path", "write_image_like",
           "write_mask_like"]

DATASETS = {"cov19ctdb": list_cov19ctdb, "lesions": list_lesions, "stoic": list_stoic}
_LOADERS = {"cov19ctdb": load_cov19ctdb, "lesions": load_hu_scan, "stoic": load_hu_scan}


def load_scan(ref: ScanRef, *, strict: bool = False, skips: SkipLog | None = None) -> Scan | None:
  """Reads the scan `ref` points to.

  Args:
    ref: from one of the DATASETS listers.
    strict: raise DataError on bad input instead of skipping.
    skips: where a skip is recorded, tagged with the ref's dataset and
      partition (always logged).

  Returns:
    The Scan (float32 (D, H, W) volume in [0, 1], labels, geometry, mask), or
    None when the scan was rejected (reason logged and in `skips`).
  """
  if ref.dataset not in _LOADERS:
    raise ValueError(f"unknown dataset {ref.dataset!r} of scan {ref.scan_id!r}; "
                     f"choose from {sorted(_LOADERS)}")
  skips = SkipLog() if skips is None else skips  # (a private one still logs)
  with skips.scope(ref.dataset, ref.partition):
    return _LOADERS[ref.dataset](ref, strict=strict, skips=skips)


def read_path(path, *, strict: bool = True, skips: SkipLog | None = None,
              max_voxels: int = MAX_VOXELS) -> Scan | None:
  """Any one scan a user names, read as the datasets of its kind are.

  ``path``: a volume file (NIfTI ``.nii``/``.nii.gz``, MetaImage ``.mha``/``.mhd``,
  NRRD, DICOM; Hounsfield units, clipped and scaled as STOIC and the lesion set), a
  folder of ``<integer>.jpg``/``.png`` slices (scaled 0..255 -> [0, 1] as
  COV19-CT-DB), or a folder holding a DICOM series (HU, as the volume files).
  The scan id is the file or folder name. Sizes are checked from the headers
  against ``max_voxels`` before any voxel is read (`covid3d.data.headers`).

  Raises:
    DataError: (``strict``, the default) naming the path and what is wrong
      with it; otherwise None is returned and the reason is in ``skips``.
  """
  path = read_common.data_path(path)
  skips = SkipLog() if skips is None else skips
  with skips.scope("scan", "infer"):
    try:
      listing = read_common.entries(path) if path.is_dir() else None
    except OSError as e:
      reject(path, read_common.os_reason(e, path), strict=strict, skips=skips)
      return None
    if listing is None and not path.is_file():
      reject(path, "no such file or folder", strict=strict, skips=skips)
      return None
    if listing and any(kind == "file" and p.suffix.lower() in SLICE_SUFFIXES
                       for p, kind in listing):
      slices = tuple(str(p) for p in list_slices(path, skips, strict=strict))
      ref = ScanRef("cov19ctdb", path.name, slices, {}, "infer")
      return load_cov19ctdb(ref, strict=strict, skips=skips, max_voxels=max_voxels)
    return load_hu_scan(ScanRef("stoic", path.name, (str(path),), {}, "infer"),
                        strict=strict, skips=skips, max_voxels=max_voxels)
