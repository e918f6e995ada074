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
  return [f"scan_{i:04d}" for i in range(len(labels))], labels


def _per_fold_counts(folds, labels, k):
  """(k, C) table: scans of class c in fold f."""
  classes = np.unique(labels)
  return np.array([[np.sum((folds == f) & (labels == c)) for c in classes]
                   for f in range(k)])


@pytest.mark.filterwarnings("ignore:The least populated class")
@pytest.mark.parametrize("counts,k", [((85, 62, 85, 26), 5), ((7, 3), 3),
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


@pytest.mark.parametrize("kwargs,match", [
    (dict(scan_ids=["a", "b", "a"], labels=[0, 1, 0]), "duplicate"),
    (dict(scan_ids=["a", "b"], labels=[0]), "differ in length"),
    (dict(scan_ids=["a", "b", "c"], labels=[0, 1, 0], k=4), "k=4"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    folds_lib.make_folds(**kwargs)


def test_csv_written_and_reused(tmp_path):
  ids, labels = _dataset((12, 8, 5))
  workdir = str(tmp_path / "run")
  folds = folds_lib.load_or_make_folds(workdir, ids, labels, k=4, seed=5)
  np.testing.assert_array_equal(folds,
                                folds_lib.make_folds(ids, labels, 4, seed=5))
  path = os.path.join(workdir, "folds.csv")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["scan_id"] for r in rows] == ids
  assert [int(r["label"]) for r in rows] == labels.tolist()
  assert [int(r["fold"]) for r in rows] == folds.tolist()
  # Reused as written: another seed does not change it, nor does the order.
  perm = np.random.default_rng(0).permutation(len(ids))
  again = folds_lib.load_or_make_folds(workdir, [ids[i] for i in perm],
                                       labels[perm], k=4, seed=99)
  np.testing.assert_array_equal(again, folds[perm])


@pytest.mark.parametrize("change,match", [
    ("drop", "other scans than requested"),
    ("add", "other scans than requested"),
    ("relabel", "another label"),
    ("k", "k=3"),
])
def test_csv_mismatch_names_file(tmp_path, change, match):
  ids, labels = _dataset((6, 6))
  folds_lib.load_or_make_folds(str(tmp_path), ids, labels, k=4)
  k = 4
  if change == "drop":
    ids, labels = ids[1:], labels[1:]
  elif change == "add":
    ids, labels = ids + ["new_scan"], np.append(labels, 0)
  elif change == "relabel":
    labels = labels.copy()
    labels[0] = 1 - labels[0]
  else:
    k = 3
  with pytest.raises(ValueError, match=match) as err:
    folds_lib.load_or_make_folds(str(tmp_path), ids, labels, k=k)
  assert os.path.join(str(tmp_path), "folds.csv") in str(err.value)


# --- Given splits: covid3d's folds.csv and the authors' split files ---------------------------
# Header and row shape of the authors' training/splitmia/cv5_infonly.csv / cv5_cov_nocov.csv
# (patient = Path with '/' -> '-'; Inf 1 non-covid, 2 covid; Sev -1 unknown or 1..4; cv fold).
AUTHORS_HEADER = "patient,Path,Set,Inf,Sev,cv"


def _authors_row(partition, cls, folder, fold, inf=None, sev=-1):
  path = f"{partition}_cov19d/{cls}/{folder}"
  inf = inf if inf is not None else (2 if cls == "covid" else 1)
  set_name = "train" if partition == "train" else "val"
  return f"{path.replace('/', '-')},{path},{set_name},{inf},{sev},{fold}"


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


AUTHORS_ROWS = [
    _authors_row("train", "covid", "ct_scan_1", 0, sev=4),
    _authors_row("train", "covid", "ct_scan_105", 1, sev=2),
    _authors_row("train", "non-covid", "ct_scan899", 2),
    _authors_row("train", "non-covid", "ct_scan_1", 1),
    _authors_row("validation", "covid", "ct_scan_101", 0, sev=3),  # another partition
]
TRAIN_IDS = ["covid/ct_scan_1", "covid/ct_scan_105", "non-covid/ct_scan899",
             "non-covid/ct_scan_1"]


def test_authors_split_maps_paths_to_scan_ids(tmp_path):
  path = _write(tmp_path / "cv5_cov_nocov.csv", [AUTHORS_HEADER] + AUTHORS_ROWS)
  got = folds_lib.read_folds_csv(path, TRAIN_IDS[::-1], k=3)
  assert got == {"non-covid/ct_scan_1": 1, "non-covid/ct_scan899": 2, "covid/ct_scan_105": 1,
                 "covid/ct_scan_1": 0}
  assert list(got) == TRAIN_IDS[::-1]
  assert folds_lib.read_folds_csv(path, ["covid/ct_scan_101"],
                                  partition="validation") == {"covid/ct_scan_101": 0}


def test_authors_paths_are_the_reader_scan_ids(tmp_path):
  from covid3d.data import read_cov19ctdb
  for cls, folder in [("covid", "ct_scan_1"), ("covid", "ct_scan_105"),
                      ("non_covid", "ct_scan899"), ("non_covid", "ct_scan_1")]:
    scan = tmp_path / "db" / "train" / cls / folder
    scan.mkdir(parents=True)
    for i in range(2):
      (scan / f"{i}.jpg").write_bytes(b"")
  ids = [r.scan_id for r in read_cov19ctdb.list_cov19ctdb(tmp_path / "db", "train")]
  path = _write(tmp_path / "split.csv", [AUTHORS_HEADER] + AUTHORS_ROWS)
  assert sorted(folds_lib.read_folds_csv(path, ids)) == sorted(TRAIN_IDS)


def test_own_format_is_read(tmp_path):
  path = _write(tmp_path / "folds.csv", ["scan_id,label,fold", "a,0,1", "b,1,0"])
  assert folds_lib.read_folds_csv(path, ["b", "a"], k=2) == {"b": 0, "a": 1}


@pytest.mark.parametrize("lines,ids,match", [
    ([AUTHORS_HEADER] + AUTHORS_ROWS, TRAIN_IDS + ["covid/ct_scan_7"],
     r"1 of the 5 scans to split are not in this authors folds file .*ct_scan_7.*"
     r"1 rows of other partitions"),
    ([AUTHORS_HEADER] + AUTHORS_ROWS, TRAIN_IDS[1:],
     r"1 rows name no scan .*'covid/ct_scan_1' \(line 2\)"),
    ([AUTHORS_HEADER] + AUTHORS_ROWS[:2] + [AUTHORS_ROWS[0]], TRAIN_IDS[:2],
     r":4: scan 'covid/ct_scan_1' is named again \(first on line 2\)"),
    ([AUTHORS_HEADER, "x,train_cov19d/ct_scan_1,train,2,-1,0"], ["covid/ct_scan_1"],
     r":2: Path .* is not <partition>_cov19d"),
    ([AUTHORS_HEADER, _authors_row("train", "covid", "ct_scan_1", "x")], ["covid/ct_scan_1"],
     r":2: fold .* not an integer"),
    (["patient,Path,Set"], ["a"], "not a folds file"),
    (["scan_id,label,fold", "a,0,0", "b,0,0"], ["a", "b"],
     r"fall in folds \[0\], not the requested k=5"),
])
def test_split_file_errors_name_the_file(tmp_path, lines, ids, match):
  path = _write(tmp_path / "split.csv", lines)
  with pytest.raises(ValueError, match=match) as err:
    folds_lib.read_folds_csv(path, ids, k=5 if "fall in" in match else None)
  assert str(err.value).startswith(path)


def test_unused_rows_can_be_allowed(tmp_path, caplog):
  path = _write(tmp_path / "split.csv", [AUTHORS_HEADER] + AUTHORS_ROWS)
  got = folds_lib.read_folds_csv(path, TRAIN_IDS[1:], allow_unused_rows=True)
  assert got == {s: f for s, f in zip(TRAIN_IDS[1:], (1, 2, 1), strict=True)}
  assert "covid/ct_scan_1" in caplog.text and path in caplog.text


def test_eccv_style_file_is_not_a_fold_split(tmp_path):
  lines = [AUTHORS_HEADER, _authors_row("train", "covid", "ct_scan_1", 1),
           _authors_row("train", "covid", "ct_scan_2", 1),
           _authors_row("validation", "covid", "ct_scan_3", 0)]
  path = _write(tmp_path / "eccv.csv", lines)
  with pytest.raises(ValueError, match="cv marks training"):
    folds_lib.read_folds_csv(path, ["covid/ct_scan_1", "covid/ct_scan_2"], k=5)


def test_load_or_make_folds_follows_a_given_split(tmp_path):
  split = _write(tmp_path / "cv.csv", [AUTHORS_HEADER] + AUTHORS_ROWS)
  labels = [1, 1, 0, 0]
  workdir = str(tmp_path / "run")
  folds = folds_lib.load_or_make_folds(workdir, TRAIN_IDS, labels, k=3, folds_csv=split)
  np.testing.assert_array_equal(folds, [0, 1, 2, 1])
  # Copied in covid3d's format, reused on rerun with or without the split file.
  own = os.path.join(workdir, "folds.csv")
  assert folds_lib.read_folds_csv(own, TRAIN_IDS) == dict(zip(TRAIN_IDS, [0, 1, 2, 1], strict=True))
  np.testing.assert_array_equal(
      folds_lib.load_or_make_folds(workdir, TRAIN_IDS, labels, k=3, folds_csv=split), folds)
  np.testing.assert_array_equal(folds_lib.load_or_make_folds(workdir, TRAIN_IDS, labels, k=3),
                                folds)
  # A workdir whose folds.csv came from another split is refused.
  other = tmp_path / "other"
  other.mkdir()
  _write(other / "folds.csv", ["scan_id,label,fold"] + [
      f"{s},{l},{f}" for s, l, f in zip(TRAIN_IDS, labels, [0, 1, 2, 2], strict=True)])
  with pytest.raises(ValueError, match=r"folds.csv holds another split than .*cv.csv for 1 scans"):
    folds_lib.load_or_make_folds(str(other), TRAIN_IDS, labels, k=3, folds_csv=split)
