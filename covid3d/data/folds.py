"""Stratified k-fold splits, deterministic by seed, persisted as a CSV; or a given split.

Every class is dealt round-robin over the folds after a seeded shuffle, so each
fold holds floor(n_c / k) or ceil(n_c / k) scans of each class c, and the
round-robin pointer carries over from one class to the next so the fold sizes
differ by at most one as well.

A split can also be read from a file (`read_folds_csv`), in either of two formats:

* covid3d's own `folds.csv`: columns `scan_id,label,fold` (`label` optional).
* the authors' split files (their `training/splitmia/cv5_infonly.csv`,
  `cv5_cov_nocov.csv`): columns `patient,Path,Set,Inf,Sev,cv`, where `Path` is
  `<partition>_cov19d/<covid|non-covid>/<scan folder>` (e.g.
  `train_cov19d/covid/ct_scan_105`, `train_cov19d/non-covid/ct_scan899`) and
  `cv` the fold 0..4. `Path` becomes covid3d's COV19-CT-DB scan id
  `<covid|non-covid>/<scan folder>` (`<scan folder>` for unlabelled test
  scans); only the rows of the requested partition are used. (Their
  `eccv.csv` and `official.csv` use `cv` for training 1 / validation 0: not
  fold splits, and rejected as such for k > 2.)
"""
import csv
import io
import logging
from collections.abc import Hashable, Sequence

import numpy as np

from covid3d import storage
from covid3d.data import read_cov19ctdb

FOLDS_FILE = "folds.csv"
PARTITION_SUFFIX = "_cov19d"  # the authors' partition folders: train_cov19d, validation_cov19d


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
    raise ValueError(f"scan_ids ({len(scan_ids)}) and labels ({len(labels)}) "
                     "differ in length")
  if len(set(scan_ids)) != len(scan_ids):
    seen, dups = set(), set()
    for s in scan_ids:
      (dups if s in seen else seen).add(s)
    raise ValueError(f"duplicate scan ids: {sorted(dups)[:10]}")
  if not 2 <= k <= len(scan_ids):
    raise ValueError(f"k={k} must be between 2 and the number of scans "
                     f"({len(scan_ids)})")
  rng = np.random.default_rng(seed)
  position = {s: i for i, s in enumerate(scan_ids)}
  folds = np.empty(len(scan_ids), np.int64)
  start = 0
  for label in sorted(set(labels)):
    members = sorted(s for s, l in zip(scan_ids, labels, strict=True) if l == label)
    members = [members[i] for i in rng.permutation(len(members))]
    for j, s in enumerate(members):
      folds[position[s]] = (start + j) % k
    start = (start + len(members)) % k
  return folds


def _read_folds_csv(path: str) -> tuple[list[str], list[str], np.ndarray]:
  reader = csv.DictReader(storage.text_lines(path))
  if reader.fieldnames != ["scan_id", "label", "fold"]:
    raise ValueError(f"{path}: expected the header scan_id,label,fold, "
                     f"found {reader.fieldnames}")
  rows = list(reader)
  try:
    folds = np.array([int(r["fold"]) for r in rows], np.int64)
  except ValueError as e:
    raise ValueError(f"{path}: a fold is not an integer ({e})") from e
  return [r["scan_id"] for r in rows], [r["label"] for r in rows], folds


def _check_same_scans(path: str, csv_ids: list[str], csv_labels: list[str],
                      scan_ids: list[str], labels: list[str]) -> None:
  stored, requested = dict(zip(csv_ids, csv_labels, strict=True)), dict(zip(scan_ids,
                                                               labels, strict=True))
  missing = sorted(set(requested) - set(stored))
  extra = sorted(set(stored) - set(requested))
  if missing or extra:
    raise ValueError(
        f"{path} holds other scans than requested: {len(missing)} requested "
        f"scans are not in it (e.g. {missing[:5]}), {len(extra)} of its scans "
        f"were not requested (e.g. {extra[:5]}); delete it or use another "
        "workdir")
  relabelled = sorted(s for s in requested if requested[s] != stored[s])
  if relabelled:
    raise ValueError(f"{path}: {len(relabelled)} scans have another label "
                     f"than requested (e.g. {relabelled[:5]}); delete it or "
                     "use another workdir")


def _partition_of(name: str) -> str | None:
  """'train_cov19d', 'train', 'val', 'validation_cov19d'... -> covid3d's partition name."""
  name = name.strip().lower()
  if name.endswith(PARTITION_SUFFIX):
    name = name[:-len(PARTITION_SUFFIX)]
  for partition, aliases in read_cov19ctdb.PARTITION_DIRS.items():
    if name in aliases:
      return partition
  return None


def _authors_scan_id(path_value: str, set_value: str) -> tuple[str | None, str]:
  """(partition or None, covid3d scan id) of an authors' `Path`; ValueError if unreadable.

  `[...]/<partition>_cov19d/<class>/<scan>` (labelled) or `[...]/<partition>_cov19d/<scan>`
  (test); without a partition folder, `<class>/<scan>` with the partition from `Set`.
  """
  parts = [p for p in path_value.strip().replace("\\", "/").split("/") if p]
  classes = read_cov19ctdb.CLASS_DIRS
  if len(parts) >= 3 and parts[-2].lower() in classes and _partition_of(parts[-3]):
    partition, labelled = _partition_of(parts[-3]), True
  elif len(parts) >= 2 and parts[-2].lower() in classes:
    partition, labelled = (_partition_of(set_value) if set_value else None), True
  elif len(parts) >= 2 and _partition_of(parts[-2]) == "test":
    partition, labelled = "test", False
  else:
    raise ValueError(f"Path {path_value!r} is not <partition>_cov19d/<covid|non-covid>/<scan>")
  if not labelled:
    return partition, parts[-1]
  return partition, f"{'covid' if classes[parts[-2].lower()] else 'non-covid'}/{parts[-1]}"


def _read_split_rows(path: str, partition: str):
  """(format, [(line, scan_id, fold)], rows of other partitions) of a split file."""
  reader = csv.DictReader(storage.text_lines(path, encoding="utf-8-sig"))
  header = reader.fieldnames or []
  rows = list(reader)
  by_lower = {h.strip().lower(): h for h in header}
  if "scan_id" in by_lower and "fold" in by_lower:
    fmt, fold_col = "covid3d", by_lower["fold"]
  elif "path" in by_lower and "cv" in by_lower:
    fmt, fold_col = "authors", by_lower["cv"]
  else:
    raise ValueError(f"{path}: not a folds file: expected the columns scan_id,label,fold "
                     f"(covid3d) or patient,Path,Set,Inf,Sev,cv (the authors' split files); "
                     f"found {header}")
  out, other = [], 0
  for line, row in enumerate(rows, start=2):
    where = f"{path}:{line}"
    if fmt == "covid3d":
      scan_id = (row[by_lower["scan_id"]] or "").strip()
    else:
      try:
        set_value = (row[by_lower["set"]] or "") if "set" in by_lower else ""
        part, scan_id = _authors_scan_id(row[by_lower["path"]] or "", set_value)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      if part is not None and part != partition:
        other += 1
        continue
    try:
      fold = int((row[fold_col] or "").strip())
    except ValueError:
      raise ValueError(f"{where}: fold {row[fold_col]!r} of {scan_id!r} is not an integer"
                       ) from None
    out.append((line, scan_id, fold))
  return fmt, out, other


def read_folds_csv(path: str, scan_ids: Sequence[str], *, k: int | None = None,
                   partition: str = "train",
                   allow_unused_rows: bool = False) -> dict[str, int]:
  """scan_id -> fold of `scan_ids`, read from a split file in either format.

  The format is told by the header (module docstring). An authors' file names
  scans by `Path`, mapped to covid3d's COV19-CT-DB scan ids; its rows of other
  partitions than `partition` are ignored.

  Args:
    path: the CSV.
    scan_ids: the scans that need a fold (e.g. the labelled training scans).
    k: when given, the folds must be 0..k-1 and each must hold a scan.
    partition: COV19-CT-DB partition of `scan_ids` ('train', 'validation',
      'test'); only for the authors' format.
    allow_unused_rows: log, instead of raising, rows that name none of
      `scan_ids` (e.g. scans the reader rejected as broken).

  Returns:
    {scan_id: fold} for every scan of `scan_ids`, in their order.

  Raises:
    ValueError: naming `path`, on an unknown header, an unreadable row, a scan
      named twice, a scan of `scan_ids` missing from the file, rows naming no
      scan of `scan_ids` (unless allowed), or folds that are not 0..k-1.
  """
  scan_ids = [str(s) for s in scan_ids]
  fmt, rows, other = _read_split_rows(path, partition)
  where = {}
  for line, scan_id, _ in rows:
    if scan_id in where:
      raise ValueError(f"{path}:{line}: scan {scan_id!r} is named again (first on line "
                       f"{where[scan_id]})")
    where[scan_id] = line
  fold_of = {scan_id: fold for _, scan_id, fold in rows}
  skipped = f" ({other} rows of other partitions than {partition!r} ignored)" if other else ""
  missing = [s for s in scan_ids if s not in fold_of]
  if missing:
    raise ValueError(f"{path}: {len(missing)} of the {len(scan_ids)} scans to split are not in "
                     f"this {fmt} folds file (e.g. {missing[:5]}){skipped}")
  wanted = set(scan_ids)
  unused = [f"{s!r} (line {where[s]})" for _, s, _ in rows if s not in wanted]
  if unused:
    msg = (f'{path}: {len(unused)} rows name no scan of the {len(scan_ids)} to split '
           f'(e.g. {", ".join(unused[:5])}){skipped}')
    if not allow_unused_rows:
      raise ValueError(msg + "; remove them or allow unused rows")
    logging.warning("%s; ignored", msg)
  out = {s: fold_of[s] for s in scan_ids}
  if k is not None:
    present = sorted(set(out.values()))
    if present != list(range(k)):
      hint = ("; in the authors' eccv.csv and official.csv, cv marks training (1) and "
              "validation (0) rows, not folds") if fmt == "authors" and len(present) == 1 else ""
      raise ValueError(f"{path}: the scans to split fall in folds {present}, not the "
                       f"requested k={k} folds 0..{k - 1}{hint}")
  return out


def _write_folds(path, scan_ids, text_labels, folds):
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(["scan_id", "label", "fold"])
  writer.writerows(zip(scan_ids, text_labels, folds.tolist(), strict=True))
  storage.write_text(path, text.getvalue())


def load_or_make_folds(workdir: str, scan_ids: Sequence[str],
                       labels: Sequence[Hashable], k: int = 5,
                       seed: int = 0, folds_csv: str = "",
                       allow_unused_rows: bool = False) -> np.ndarray:
  """Reads `workdir/folds.csv`, or makes the folds (or takes `folds_csv`'s) and writes it.

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
    folds_csv: a split file to follow instead of `make_folds` (either format,
      see `read_folds_csv`; the scans are of the 'train' partition); it is
      copied to `workdir/folds.csv`, and an existing `workdir/folds.csv` must
      hold the same split.
    allow_unused_rows: as in `read_folds_csv`.

  Returns:
    int64 array (N,): the fold of each scan, aligned with `scan_ids`.

  Raises:
    ValueError: naming the CSV when it does not match the request.
  """
  path = storage.as_path(workdir) / FOLDS_FILE
  scan_ids = [str(s) for s in scan_ids]
  text_labels = [str(l) for l in labels]
  if folds_csv:
    given = read_folds_csv(folds_csv, scan_ids, k=k, allow_unused_rows=allow_unused_rows)
    folds = np.array([given[s] for s in scan_ids], np.int64)
    if path.exists() and path != storage.as_path(folds_csv):
      stored = load_or_make_folds(workdir, scan_ids, labels, k)
      if not np.array_equal(stored, folds):
        raise ValueError(f"{path} holds another split than {folds_csv} for "
                         f"{int(np.sum(stored != folds))} scans; delete it or use another "
                         "workdir")
    elif not path.exists():
      _write_folds(path, scan_ids, text_labels, folds)
    return folds
  if path.exists():
    csv_ids, csv_labels, csv_folds = _read_folds_csv(path)
    if len(set(csv_ids)) != len(csv_ids):
      raise ValueError(f"{path}: duplicate scan ids")
    _check_same_scans(path, csv_ids, csv_labels, scan_ids, text_labels)
    if csv_folds.min() < 0 or csv_folds.max() >= k or len(set(
        csv_folds.tolist())) != k:
      raise ValueError(f"{path}: holds folds {sorted(set(csv_folds.tolist()))}"
                       f", not the requested k={k}")
    fold_of = dict(zip(csv_ids, csv_folds.tolist(), strict=True))
    return np.array([fold_of[s] for s in scan_ids], np.int64)
  folds = make_folds(scan_ids, labels, k, seed)
  _write_folds(path, scan_ids, text_labels, folds)
  return folds
