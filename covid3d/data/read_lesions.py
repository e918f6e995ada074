"""COVID-19-20 lesion segmentation set reader (NIfTI, nibabel).

Layout: `<root>/Train/<name>_ct.nii.gz` with `<name>_seg.nii.gz` (lesion mask on
the same grid) and `<root>/Validation/<name>_ct.nii.gz` (no masks); the
partition folder may be lower case, or absent (files directly in root). The
scan id is `<name>`. Volumes are in Hounsfield units, clipped to
[-1000, 500] and mapped to [0, 1]; orientation is brought to the canonical
(D, H, W) LPS layout from the affine (`covid3d.data.scan`).
"""
from pathlib import Path

from covid3d.data import read_common
from covid3d.data import scan as scan_lib
from covid3d.data.skips import SkipLog

PARTITION_DIRS = {"train": ("Train", "train"), "validation": ("Validation", "validation"),
                  "test": ("Test", "test")}
CT_SUFFIXES = ("_ct.nii.gz", "_ct.nii")
SEG_SUFFIXES = ("_seg.nii.gz", "_seg.nii")


def _strip(name: str, suffixes) -> str | None:
  low = name.lower()
  for s in suffixes:
    if low.endswith(s):
      return name[:-len(s)]
  return None


def list_lesions(root, partition: str = "train", *, strict: bool = False,
                 skips: SkipLog | None = None) -> list[scan_lib.ScanRef]:
  """Lists the CT volumes (and their masks) of one partition, sorted by file name.

  A `_seg` file without its `_ct` file and any other file are logged and
  ignored. Two CT files of one scan name (`a_ct.nii` and `a_ct.nii.gz`, or
  `a_ct.NII.GZ`) are a duplicate scan id: the one with a readable header is
  used, then the one with a lower-case extension, then the first by name
  (`read_common.best_first`); the other is a 'scan' skip.

  Raises:
    DataError: missing or unreadable partition folder (any mode); in strict
      mode any bad input.
  """
  skips = SkipLog() if skips is None else skips  # (a private one still logs)
  with skips.scope("lesions", partition):
    return _list(read_common.data_path(root), partition, strict, skips)


def _list(root: Path, partition: str, strict: bool, skips: SkipLog):
  folder = read_common.partition_dir(root, partition, PARTITION_DIRS, flat_ok=True)
  cts, segs = {}, {}
  for p, kind in read_common.dataset_folder_entries(folder, "partition folder"):
    if kind == "file" and _strip(p.name, CT_SUFFIXES) is not None:
      cts.setdefault(_strip(p.name, CT_SUFFIXES), []).append(p)
    elif kind == "file" and _strip(p.name, SEG_SUFFIXES) is not None:
      segs.setdefault(_strip(p.name, SEG_SUFFIXES), []).append(p)
    else:
      read_common.stray(p, skips, "a <name>_ct.nii.gz / <name>_seg.nii.gz file")
  skips.count_offered("lesions", partition, sum(map(len, cts.values())))
  masks = {}
  for n, paths in segs.items():
    if n not in cts:
      for p in paths:
        read_common.stray(p, skips, f"a mask of an existing CT ({n}_ct.nii.gz is missing)")
      continue
    paths, _ = read_common.best_first(paths)
    masks[n] = paths[0]
    for p in paths[1:]:
      read_common.stray(p, skips, f"the one mask of {n!r} ({paths[0].name} is used)")
  refs, notes = [], {}
  for n, paths in cts.items():
    paths, why = read_common.best_first(paths)
    notes.update(why)
    refs += [scan_lib.ScanRef("lesions", n, (str(p),), {}, partition,
                              str(masks[n]) if n in masks else None) for p in paths]
  return read_common.unique_ids(refs, strict=strict, skips=skips, notes=notes)
