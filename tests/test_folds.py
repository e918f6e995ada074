"""Tests for covid3d.data.folds."""
import csv
import os

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from covid3d.data import folds as folds_lib


def _dataset(counts, seed=0):
  """Scan ids and labels with `counts[c]` scans of class c, in random order."""
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
  labels = np.random.default_rng(seed).permutation(labels)
  return [f'scan_{i:04d}' for i in range(len(labels))], labels


def _per_fold_counts(folds, labels, k):
  """(k, C) table: scans of class c in fold f."""
  classes = np.unique(labels)
  return np.array([[np.sum((folds == f) & (labels == c)) for c in classes]
                   for f in range(k)])


@pytest.mark.filterwarnings('ignore:The least populated class')
@pytest.mark.parametrize('counts,k', [((85, 62, 85, 26), 5), ((7, 3), 3),
                                      ((10, 11, 12), 4), ((2, 9), 5)])
def test_class_balance_matches_sklearn(counts, k):
  ids, labels = _dataset(counts)
  folds = folds_lib.make_folds(ids, labels, k=k, seed=3)
  ours = _per_fold_counts(folds, labels, k)
  for c, n in enumerate(counts):
    assert set(ours[:, c]) <= {n // k, -(-n // k)}
    assert ours[:, c].sum() == n
  # sklearn's StratifiedKFold deals classes out the same way: the multiset of
  # per-fold counts of each class must agree.
  sk_folds = np.empty(len(ids), np.int64)
  skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
  for f, (_, test) in enumerate(skf.split(np.zeros(len(ids)), labels)):
    sk_folds[test] = f
  theirs = _per_fold_counts(sk_folds, labels, k)
  np.testing.assert_array_equal(np.sort(ours, axis=0), np.sort(theirs, axis=0))
  sizes = np.bincount(folds, minlength=k)
  assert sizes.max() - sizes.min() <= 1


def test_deterministic_by_seed_and_order_free():
  ids, labels = _dataset((30, 20, 25, 9))
  a = folds_lib.make_folds(ids, labels, k=5, seed=1)
  np.testing.assert_array_equal(a, folds_lib.make_folds(ids, labels, 5, 1))
  assert not np.array_equal(a, folds_lib.make_folds(ids, labels, 5, 2))
  perm = np.random.default_rng(9).permutation(len(ids))
  shuffled = folds_lib.make_folds([ids[i] for i in perm], labels[perm], 5, 1)
  np.testing.assert_array_equal(shuffled, a[perm])


@pytest.mark.parametrize('kwargs,match', [
    (dict(scan_ids=['a', 'b', 'a'], labels=[0, 1, 0]), 'duplicate'),
    (dict(scan_ids=['a', 'b'], labels=[0]), 'differ in length'),
    (dict(scan_ids=['a', 'b', 'c'], labels=[0, 1, 0], k=4), 'k=4'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    folds_lib.make_folds(**kwargs)


def test_csv_written_and_reused(tmp_path):
  ids, labels = _dataset((12, 8, 5))
  workdir = str(tmp_path / 'run')
  folds = folds_lib.load_or_make_folds(workdir, ids, labels, k=4, seed=5)
  np.testing.assert_array_equal(folds,
                                folds_lib.make_folds(ids, labels, 4, seed=5))
  path = os.path.join(workdir, 'folds.csv')
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['scan_id'] for r in rows] == ids
  assert [int(r['label']) for r in rows] == labels.tolist()
  assert [int(r['fold']) for r in rows] == folds.tolist()
  # Reused as written: another seed does not change it, nor does the order.
  perm = np.random.default_rng(0).permutation(len(ids))
  again = folds_lib.load_or_make_folds(workdir, [ids[i] for i in perm],
                                       labels[perm], k=4, seed=99)
  np.testing.assert_array_equal(again, folds[perm])


@pytest.mark.parametrize('change,match', [
    ('drop', 'other scans than requested'),
    ('add', 'other scans than requested'),
    ('relabel', 'another label'),
    ('k', 'k=3'),
])
def test_csv_mismatch_names_file(tmp_path, change, match):
  ids, labels = _dataset((6, 6))
  folds_lib.load_or_make_folds(str(tmp_path), ids, labels, k=4)
  k = 4
  if change == 'drop':
    ids, labels = ids[1:], labels[1:]
  elif change == 'add':
    ids, labels = ids + ['new_scan'], np.append(labels, 0)
  elif change == 'relabel':
    labels = labels.copy()
    labels[0] = 1 - labels[0]
  else:
    k = 3
  with pytest.raises(ValueError, match=match) as err:
    folds_lib.load_or_make_folds(str(tmp_path), ids, labels, k=k)
  assert os.path.join(str(tmp_path), 'folds.csv') in str(err.value)
