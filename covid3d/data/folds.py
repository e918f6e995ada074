"""Stratified k-fold splits, deterministic by seed, persisted as a CSV.

Every class is dealt round-robin over the folds after a seeded shuffle, so each
fold holds floor(n_c / k) or ceil(n_c / k) scans of each class c, and the
round-robin pointer carries over from one class to the next so the fold sizes
differ by at most one as well.
"""
import csv
import os
from collections.abc import Hashable, Sequence

import numpy as np

FOLDS_FILE = 'folds.csv'


def make_folds(scan_ids: Sequence[str], labels: Sequence[Hashable], k: int = 5,
               seed: int = 0) -> np.ndarray:
  """Assigns each scan to one of `k` folds, stratified by label.

  The result depends only on the (scan_id, label) pairs, `k` and `seed`, not on
  the order in which the scans are given.

  Args:
    scan_ids: N unique scan ids.
    labels: N class labels (any sortable values; -1 is just another class).
    k: number of folds, 2 <= k <= N.
    seed: seed of the per-class shuffle.

  Returns:
    int64 array (N,): the fold (0..k-1) of each scan, aligned with `scan_ids`.

  Raises:
    ValueError: on mismatched lengths, duplicate scan ids or a bad `k`.
  """
  scan_ids = [str(s) for s in scan_ids]
  labels = list(labels)
  if len(scan_ids) != len(labels):
    raise ValueError(f'scan_ids ({len(scan_ids)}) and labels ({len(labels)}) '
                     'differ in length')
  if len(set(scan_ids)) != len(scan_ids):
    seen, dups = set(), set()
    for s in scan_ids:
      (dups if s in seen else seen).add(s)
    raise ValueError(f'duplicate scan ids: {sorted(dups)[:10]}')
  if not 2 <= k <= len(scan_ids):
    raise ValueError(f'k={k} must be between 2 and the number of scans '
                     f'({len(scan_ids)})')
  rng = np.random.default_rng(seed)
  position = {s: i for i, s in enumerate(scan_ids)}
  folds = np.empty(len(scan_ids), np.int64)
  start = 0
  for label in sorted(set(labels)):
    members = sorted(s for s, l in zip(scan_ids, labels) if l == label)
    members = [members[i] for i in rng.permutation(len(members))]
    for j, s in enumerate(members):
      folds[position[s]] = (start + j) % k
    start = (start + len(members)) % k
  return folds


def _read_folds_csv(path: str) -> tuple[list[str], list[str], np.ndarray]:
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    if reader.fieldnames != ['scan_id', 'label', 'fold']:
      raise ValueError(f'{path}: expected the header scan_id,label,fold, '
                       f'found {reader.fieldnames}')
    rows = list(reader)
  try:
    folds = np.array([int(r['fold']) for r in rows], np.int64)
  except ValueError as e:
    raise ValueError(f'{path}: a fold is not an integer ({e})') from e
  return [r['scan_id'] for r in rows], [r['label'] for r in rows], folds


def _check_same_scans(path: str, csv_ids: list[str], csv_labels: list[str],
                      scan_ids: list[str], labels: list[str]) -> None:
  stored, requested = dict(zip(csv_ids, csv_labels)), dict(zip(scan_ids,
                                                               labels))
  missing = sorted(set(requested) - set(stored))
  extra = sorted(set(stored) - set(requested))
  if missing or extra:
    raise ValueError(
        f'{path} holds other scans than requested: {len(missing)} requested '
        f'scans are not in it (e.g. {missing[:5]}), {len(extra)} of its scans '
        f'were not requested (e.g. {extra[:5]}); delete it or use another '
        'workdir')
  relabelled = sorted(s for s in requested if requested[s] != stored[s])
  if relabelled:
    raise ValueError(f'{path}: {len(relabelled)} scans have another label '
                     f'than requested (e.g. {relabelled[:5]}); delete it or '
                     'use another workdir')


def load_or_make_folds(workdir: str, scan_ids: Sequence[str],
                       labels: Sequence[Hashable], k: int = 5,
                       seed: int = 0) -> np.ndarray:
  """Reads `workdir/folds.csv`, or makes the folds and writes it.

  An existing CSV is reused as it is (whatever seed made it), after checking
  that it holds exactly the requested scans with the same labels and `k`
  folds. The file is written atomically, so several processes sharing the
  workdir may call this at once.

  Args:
    workdir: directory of the run; created if missing.
    scan_ids: N unique scan ids.
    labels: N class labels; stored as text (`str(label)`) in the CSV.
    k: number of folds.
    seed: seed for `make_folds` when the CSV does not exist yet.

  Returns:
    int64 array (N,): the fold of each scan, aligned with `scan_ids`.

  Raises:
    ValueError: naming the CSV when it does not match the request.
  """
  path = os.path.join(workdir, FOLDS_FILE)
  scan_ids = [str(s) for s in scan_ids]
  text_labels = [str(l) for l in labels]
  if os.path.exists(path):
    csv_ids, csv_labels, csv_folds = _read_folds_csv(path)
    if len(set(csv_ids)) != len(csv_ids):
      raise ValueError(f'{path}: duplicate scan ids')
    _check_same_scans(path, csv_ids, csv_labels, scan_ids, text_labels)
    if csv_folds.min() < 0 or csv_folds.max() >= k or len(set(
        csv_folds.tolist())) != k:
      raise ValueError(f'{path}: holds folds {sorted(set(csv_folds.tolist()))}'
                       f', not the requested k={k}')
    fold_of = dict(zip(csv_ids, csv_folds.tolist()))
    return np.array([fold_of[s] for s in scan_ids], np.int64)
  folds = make_folds(scan_ids, labels, k, seed)
  os.makedirs(workdir, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['scan_id', 'label', 'fold'])
    writer.writerows(zip(scan_ids, text_labels, folds.tolist()))
  os.replace(tmp, path)
  return folds
