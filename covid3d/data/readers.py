"""Readers of the three datasets: list scans (`DATASETS`), load one (`load_scan`).

  refs = readers.list_cov19ctdb('/data/cov19ctdb', 'train', skips=skips)
  scan = readers.load_scan(refs[0], skips=skips)  # Scan, or None if rejected

Formats, label CSVs and tolerated variants: `read_cov19ctdb`, `read_lesions`,
`read_stoic`. Axis convention and writing masks back: `covid3d.data.scan`.
Bad input raises `DataError` with `strict=True`, else is logged and recorded in
`skips` (`covid3d.data.skips`), tagged with the dataset and partition; the
listings also count the scans they found there (the ledger,
`covid3d.data.ledger`). One SkipLog may collect every dataset and partition.
"""
from covid3d.data.read_common import load_hu_scan
from covid3d.data.read_cov19ctdb import list_cov19ctdb, load_cov19ctdb
from covid3d.data.read_lesions import list_lesions
from covid3d.data.read_stoic import list_stoic
from covid3d.data.scan import Scan, ScanRef, write_mask_like
from covid3d.data.skips import DataError, SkipLog

__all__ = ['DATASETS', 'DataError', 'Scan', 'ScanRef', 'SkipLog', 'list_cov19ctdb',
           'list_lesions', 'list_stoic', 'load_scan', 'write_mask_like']

DATASETS = {'cov19ctdb': list_cov19ctdb, 'lesions': list_lesions, 'stoic': list_stoic}
_LOADERS = {'cov19ctdb': load_cov19ctdb, 'lesions': load_hu_scan, 'stoic': load_hu_scan}


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
    raise ValueError(f'unknown dataset {ref.dataset!r} of scan {ref.scan_id!r}; '
                     f'choose from {sorted(_LOADERS)}')
  skips = SkipLog() if skips is None else skips  # (a private one still logs)
  with skips.scope(ref.dataset, ref.partition):
    return _LOADERS[ref.dataset](ref, strict=strict, skips=skips)
