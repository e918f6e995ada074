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

PARTITION_DIRS = {'train': ('Train', 'train'), 'validation': ('Validation', 'validation'),
                  'test': ('Test', 'test')}
CT_SUFFIXES = ('_ct.nii.gz', '_ct.nii')
SEG_SUFFIXES = ('_seg.nii.gz', '_seg.nii')


def _strip(name: str, suffixes) -> str | None:
  low = name.lower()
  for s in suffixes:
    if low.endswith(s):
      return name[:-len(s)]
  return None


def list_lesions(root, partition: str = 'train', *, strict: bool = False,
                 skips: SkipLog | None = None) -> list[scan_lib.ScanRef]:
  """Lists the CT volumes (and their masks) of one partition, sorted by id.

  A `_seg` file without its `_ct` file and any other file are logged and
  ignored; the same scan name twice (e.g. `.nii` and `.nii.gz`) is a
  duplicate scan id.
  """
  root = Path(root)
  folder = read_common.partition_dir(root, partition, PARTITION_DIRS, flat_ok=True)
  cts, segs = [], {}
  for p in sorted(folder.iterdir()):
    if p.is_file() and _strip(p.name, CT_SUFFIXES) is not None:
      cts.append((_strip(p.name, CT_SUFFIXES), p))
    elif p.is_file() and _strip(p.name, SEG_SUFFIXES) is not None:
      segs.setdefault(_strip(p.name, SEG_SUFFIXES), p)
    else:
      read_common.stray(p, skips, 'a <name>_ct.nii.gz / <name>_seg.nii.gz file')
  names = {n for n, _ in cts}
  for n, p in segs.items():
    if n not in names:
      read_common.stray(p, skips, f'a mask of an existing CT ({n}_ct.nii.gz is missing)')
  refs = [scan_lib.ScanRef('lesions', n, (str(p),), {}, partition,
                           str(segs[n]) if n in segs else None) for n, p in cts]
  return read_common.unique_ids(refs, strict=strict, skips=skips)

