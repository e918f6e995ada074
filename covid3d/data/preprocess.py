"""Preprocessing: resample scans to cubes, cache them, read them back.

`preprocess_scan` turns a Scan into a *record* (`covid3d.data.schema`): the
volume resampled anisotropically straight to each cube size s (as the authors
do: no spacing used) with a cubic spline (order 3), clipped back to [0, 1]
after the spline's overshoot and stored as float16, or as uint8 round(255 v)
(``dtype``; docs/data.md has the error); the mask (if any) resampled with
order 0. `build_cache` does that for many scans in parallel into a
content-keyed cache (`covid3d.data.cache`, a folder or ``gs://``), also split
across the processes of a pod that share one store (``share``), and
`read_record` reads one back, only the fields used and memory-mapped.
A scan that cannot be read is skipped (its reason in the `SkipLog`); the
SkipLog also gets the ledger counts (refs received, records used, per dataset
and partition), printed with the summary and written to skips.json. The
command (`main`) ends a bad-input error with one line on stderr and status 2.

Resampling. `resample` equals `scipy.ndimage.zoom(x, out/in, order=3,
mode='mirror', grid_mode=False)` (corner voxels map onto corner voxels) but
runs as three 1-D passes, shrinking axes first: the cubic B-spline is a tensor
product, so interpolating along one axis at a time (1-D prefilter, then a
sparse 4-tap sampling matrix) gives the same values with 4 taps per axis
instead of 4^3 per voxel (about 6 times faster at 160 x 512^2 -> 256^3,
see docs/data.md).
"""
import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Mapping

import numpy as np
import scipy.ndimage
import scipy.sparse

from covid3d import storage
from covid3d.data import cache
from covid3d.data import readers
from covid3d.data import schema
from covid3d.data.read_common import unique_ids
from covid3d.data.skips import DataError, Skip, SkipLog, reject

DEFAULT_SIZES = (256, 224)
LABEL_KEYS = ("covid", "severity", "stoic_covid", "stoic_severe")
RECORD_DTYPES = ("float16", "uint8")
# Part of every cache key: change it when the preprocessing's output changes
# (2: one .npy file per array instead of one .npz per scan).
VERSION = 2


def _spline_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64 cubic B-spline sampling matrix, mirror boundary.

  Output point o sits at input coordinate x = o * (n_in - 1) / (n_out - 1);
  row o holds the weights of the spline coefficients at floor(x) - 1 .. + 2.
  """
  step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  x = np.arange(n_out) * step
  base = np.floor(x)
  t = x - base
  cols = base.astype(np.int64)[:, None] + np.arange(-1, 3)
  weights = np.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4,
                      -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1, t ** 3], axis=1) / 6
  if n_in == 1:
    cols = np.zeros_like(cols)
  else:  # whole-sample mirror: -1 -> 1, n_in -> n_in - 2
    period = 2 * (n_in - 1)
    cols = np.abs(cols) % period
    cols = np.where(cols >= n_in, period - cols, cols)
  out = np.zeros((n_out, n_in))
  np.add.at(out, (np.repeat(np.arange(n_out), 4), cols.ravel()), weights.ravel())
  return out


@functools.lru_cache(maxsize=64)
def _cubic_matrix(n_in: int, n_out: int) -> scipy.sparse.csr_matrix:
  """`_spline_weights` as a float32 sparse matrix (4 entries a row)."""
  return scipy.sparse.csr_matrix(_spline_weights(n_in, n_out).astype(np.float32))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Input index of each output point for order 0 (floor(x + 0.5), as scipy)."""
  step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  return np.minimum(np.floor(np.arange(n_out) * step + 0.5).astype(np.int64), n_in - 1)


def resample(volume: np.ndarray, shape, order: int = 3) -> np.ndarray:
  """Resamples a 3-D array to `shape` (corner voxels aligned, mirror boundary).

  Args:
    volume: (D, H, W) array.
    shape: output (D', H', W').
    order: 3 (cubic spline; float32 out) or 0 (nearest; dtype kept).

  Returns:
    The resampled array; equals scipy.ndimage.zoom(volume, zoom,
    order=order, mode='mirror', grid_mode=False) with the zoom giving `shape`
    (up to float32 rounding).
  """
  if order not in (0, 3):
    raise ValueError(f"order {order} not supported (0 or 3)")
  out = volume.astype(np.float32) if order == 3 else volume
  # Shrinking axes first keeps the intermediate arrays small.
  for axis in sorted(range(3), key=lambda a: shape[a] / volume.shape[a]):
    n_in, n_out = out.shape[axis], shape[axis]
    if n_in == n_out:
      continue
    if order == 0:
      out = np.take(out, _nearest_index(n_in, n_out), axis=axis)
      continue
    coef = scipy.ndimage.spline_filter1d(out, 3, axis=axis, output=np.float32, mode="mirror")
    moved = np.ascontiguousarray(np.moveaxis(coef, axis, 0))
    res = _cubic_matrix(n_in, n_out) @ moved.reshape(n_in, -1)
    out = np.moveaxis(res.reshape((n_out,) + moved.shape[1:]), 0, axis)
  return np.ascontiguousarray(out)


def zoom_linear(cube: np.ndarray, shape) -> np.ndarray:
  """A model-grid map (e.g. lesion probabilities) resampled linearly to ``shape``, float32.

  On the host: every scan has its own shape, and a jitted resize would compile
  once per shape. Order 1 with ``grid_mode=False`` is the corners-aligned
  convention of ``models.ops.resize_linear(align_corners=True)``.
  """
  cube = np.asarray(cube, np.float32)
  return scipy.ndimage.zoom(cube, np.divide(shape, cube.shape), order=1, grid_mode=False)


def settings(sizes, dtype: str = "float16") -> dict:
  """The preprocessing settings that go into every cache key."""
  if dtype not in RECORD_DTYPES:
    raise ValueError(f"record dtype {dtype!r} is not one of {RECORD_DTYPES}")
  return {"version": VERSION, "sizes": [int(s) for s in sizes], "volume_order": 3,
          "mask_order": 0, "boundary": "mirror", "dtype": dtype}


def preprocess_scan(scan, sizes=DEFAULT_SIZES, dtype: str = "float16") -> dict:
  """A Scan -> its record (module doc; fields in `covid3d.data.schema`).

  Args:
    scan: a Scan (float32 (D, H, W) volume in [0, 1], optional uint8 mask).
    sizes: cube edge lengths s.
    dtype: the volumes' dtype, 'float16' or 'uint8' (round(255 v); read back
      as v / 255, `schema.decode_volume`).

  Returns:
    {'scan_id', 'volume_<s>': `dtype` (s, s, s), 'mask_<s>': uint8 (s, s, s)
    (zeros without a mask), 'has_mask', 'covid', 'severity', 'stoic_covid',
    'stoic_severe'} (ints as int32, unknown labels -1).
  """
  settings(sizes, dtype)  # checks the dtype
  record = {"scan_id": scan.scan_id}
  for s in sizes:
    volume = resample(scan.volume, (s, s, s), order=3)
    np.clip(volume, 0.0, 1.0, out=volume)
    record[schema.volume_key(s)] = (np.round(volume * 255).astype(np.uint8) if dtype == "uint8"
                                    else volume.astype(np.float16))
    record[schema.mask_key(s)] = (
        resample(scan.mask, (s, s, s), order=0).astype(np.uint8) if scan.mask is not None
        else np.zeros((s, s, s), np.uint8))
  record["has_mask"] = np.int32(scan.mask is not None)
  for k in LABEL_KEYS:
    record[k] = np.int32(scan.labels.get(k, -1))
  return record


class Record(Mapping):
  """A cached record (as `preprocess_scan` made it) whose arrays are read when looked up.

  Looking up an array memory-maps its one `.npy` file (`cache.read_array`), so
  a stage pays only for the cube sizes and fields it uses; a mask the scan
  has none of is zeros. Ints are int32, 'scan_id' a str.
  """

  def __init__(self, path, meta: dict):
    self.path, self._meta = str(path), meta
    self._arrays = {k: None for k in meta["arrays"]}
    sizes = [int(k.removeprefix("volume_")) for k in meta["arrays"] if k.startswith("volume_")]
    self._arrays.update({schema.mask_key(s): s for s in sizes
                         if schema.mask_key(s) not in self._arrays})

  def __getitem__(self, key):
    if key in self._arrays:
      s = self._arrays[key]
      return (cache.read_array(cache.array_file(self.path, key)) if s is None
              else np.zeros((s, s, s), np.uint8))
    if key == "scan_id":
      return str(self._meta[key])
    if key == "arrays" or key not in self._meta:
      raise KeyError(key)
    return np.int32(self._meta[key])

  def __iter__(self):
    yield from (k for k in self._meta if k != "arrays")
    yield from self._arrays

  def __len__(self):
    return len(self._meta) - 1 + len(self._arrays)


def read_record(path) -> Record:
  """One cached record from its JSON file (`cache.record_file`); arrays read on look-up."""
  return Record(path, cache.read_meta(path))


def _cache_one(ref, cache_dir: str, sizes, strict: bool, dtype: str = "float16"):
  """Worker: (record path or None, skip entries, 'built'|'cached'|'skipped')."""
  skips = SkipLog()
  with skips.scope(ref.dataset, ref.partition):
    try:
      key = cache.cache_key(ref, settings(sizes, dtype))
    except OSError as e:
      reject(e.filename or ref.paths[0], f"unreadable input file: {e.strerror or e}",
             strict=strict, skips=skips)
      return None, skips.entries, "skipped"
    path = os.path.join(cache_dir, cache.record_file(ref, key))
    if storage.as_path(path).exists():
      return path, skips.entries, "cached"
    try:
      scan = readers.load_scan(ref, strict=strict, skips=skips)
    except OSError as e:  # the readers catch their own; this is the backstop
      reject(e.filename or ref.paths[0], f"unreadable input: {e.strerror or e}",
             strict=strict, skips=skips)
      return None, skips.entries, "skipped"
    if scan is None:
      return None, skips.entries, "skipped"
  record = preprocess_scan(scan, sizes, dtype)
  if not record["has_mask"]:
    record = {k: v for k, v in record.items() if not k.startswith("mask_")}
  cache.write_record(path, record)
  return path, skips.entries, "built"


def _run_share(args, bar, workers: int) -> dict:
  """{position: `_cache_one` result} of the (position, args) pairs in ``args``."""
  results = {}
  if workers <= 1 or len(args) <= 1:
    for i, a in args:
      results[i] = _cache_one(*a)
      bar.update()
    return results
  ctx = multiprocessing.get_context("spawn")  # no fork of a (possibly JAX) parent
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(args)), mp_context=ctx) as ex:
    futures = {ex.submit(_cache_one, *a): i for i, a in args}
    try:
      for f in concurrent.futures.as_completed(futures):
        results[futures[f]] = f.result()
        bar.update()
    except BaseException:
      ex.shutdown(cancel_futures=True)
      raise
  return results


def _part_file(cache_dir, process: int, count: int):
  return storage.as_path(cache_dir) / f".build-{process}-of-{count}.json"


def _gather_shares(refs, mine: dict, cache_dir, share, sync) -> list:
  """Every process's results, in the order of ``refs``, on every process.

  Each process writes the results of its share (file name, status, skip
  entries) to a part file of its own in the store, all wait at ``sync``, and
  each reads every part. A part names its scans, so hosts that listed
  different scans stop here rather than train on different data.
  """
  process, count = share
  storage.write_json(_part_file(cache_dir, process, count), [
      {"position": i, "scan": [refs[i].dataset, refs[i].partition, refs[i].scan_id],
       "file": path and os.path.basename(path), "status": status,
       "skips": [dataclasses.asdict(e) for e in entries]}
      for i, (path, entries, status) in sorted(mine.items())])
  sync(f"covid3d records built {cache_dir} {len(refs)}")
  results = [None] * len(refs)
  parts = [_part_file(cache_dir, p, count) for p in range(count)]
  for p, data in enumerate(storage.read_many(parts)):  # (gcsfs: no listing it made before)
    if isinstance(data, BaseException):
      raise data
    for row in json.loads(data):
      i = row["position"]
      if i % count != p or list(row["scan"]) != [refs[i].dataset, refs[i].partition,
                                                 refs[i].scan_id]:
        raise ValueError(f"{_part_file(cache_dir, p, count)}: process {p} built other scans "
                         "than this process listed (do all hosts see the same data?)")
      path = row["file"] and os.path.join(str(cache_dir), row["file"])
      results[i] = (path, [Skip(**e) for e in row["skips"]], row["status"])
  if None in results:
    raise ValueError(f"{cache_dir}: scan {refs[results.index(None)].scan_id} has no result in "
                     "the processes' part files")
  return results


def build_cache(refs, cache_dir, sizes=DEFAULT_SIZES, *, workers: int | None = None,
                strict: bool = False, skips: SkipLog | None = None, progress: bool = True,
                workdir=None, dtype: str = "float16", share: tuple[int, int] = (0, 1),
                sync=None) -> list[str]:
  """Reads and preprocesses scans into the cache, skipping finished ones.

  Args:
    refs: ScanRefs (any datasets/partitions; duplicate ids are rejected).
    cache_dir: folder of the record files and index.csv (created), local or
      ``gs://``.
    sizes: cube edge lengths.
    workers: processes (spawned; None: one per CPU; 0 or 1: this process).
    strict: raise DataError on the first bad input instead of skipping it.
    skips: SkipLog to add to (e.g. holding the listing's skips and counts);
      a new one if None. Its ledger counts get, per dataset/partition, the
      refs received and the records used (`SkipLog.count_built`); skips are
      tagged with the ref's dataset and partition.
    progress: show a tqdm progress bar.
    workdir: where skips.json goes (default cache_dir).
    dtype: the volumes' dtype, 'float16' or 'uint8' (`preprocess_scan`).
    share: (process p, process count n) of a build shared by n processes that
      all see ``cache_dir`` and got the same ``refs``: this one builds only
      the scans at positions p, p + n, p + 2n, ... (after duplicates are
      dropped); the results meet through part files in ``cache_dir``
      (`_gather_shares`), process 0 writes index.csv, and every process
      returns every path.
    sync: with n > 1, ``sync(name)`` returns once every process has called it
      with that name (e.g. ``multihost_utils.sync_global_devices``).

  Returns:
    Record file paths of the readable scans, in the order of `refs`.

  The run ends with the skip summary and the ledger of the partitions built
  printed, with this process's writes, and `skips` (all of it) written to
  skips.json.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  process, count = share
  if count > 1 and sync is None:
    raise ValueError("a build shared by several processes needs `sync`")
  skips = SkipLog() if skips is None else skips
  if not storage.is_remote(cache_dir):
    os.makedirs(cache_dir, exist_ok=True)
  else:  # gcsfs answers `exists` from listings it made before: list the store afresh
    storage.list_names(cache_dir)
  refs = list(refs)
  received = collections.Counter((r.dataset, r.partition) for r in refs)
  refs = unique_ids(refs, strict=strict, skips=skips)
  workers = os.cpu_count() if workers is None else workers
  settings(sizes, dtype)  # a bad dtype stops here, before any work
  args = [(i, (ref, str(cache_dir), tuple(sizes), strict, dtype))
          for i, ref in enumerate(refs) if i % count == process]
  with tqdm(total=len(args), desc=f"preprocess {tuple(sizes)}", disable=not progress,
            file=sys.stderr) as bar:
    mine = _run_share(args, bar, workers)
  results = ([mine[i] for i in range(len(refs))] if count == 1 else
             _gather_shares(refs, mine, cache_dir, share, sync))
  rows, paths, counts = [], [], {"built": 0, "cached": 0, "skipped": 0}
  used = collections.Counter()
  for ref, (path, entries, status) in zip(refs, results, strict=True):
    skips.extend(entries)
    counts[status] += 1
    if path is None:
      continue
    used[(ref.dataset, ref.partition)] += 1
    paths.append(path)
    rows.append({"dataset": ref.dataset, "partition": ref.partition, "scan_id": ref.scan_id,
                 **{k: ref.labels.get(k, -1) for k in LABEL_KEYS},
                 "has_mask": int(ref.mask_path is not None), "file": os.path.basename(path)})
  if process == 0:
    cache.update_index(cache_dir, rows)
  if count > 1:  # nobody reads index.csv before process 0 has written it
    sync(f"covid3d records indexed {cache_dir} {len(refs)}")
    if storage.is_remote(cache_dir):  # gcsfs would answer from the listing made above
      storage.list_names(cache_dir)
  for (dataset, partition), n in received.items():
    skips.count_built(dataset, partition, received=n, used=used[(dataset, partition)])
  wrote = collections.Counter(status for _, _, status in mine.values())
  print(f'{len(refs)} scans: {counts["built"]} preprocessed, {counts["cached"]} from the '
        f'cache, {counts["skipped"]} skipped; process {process} of {count} wrote '
        f'{wrote["built"]} records and found {wrote["cached"]} of its {len(mine)}; '
        f'{skips.summary(pairs=received)}')
  skips.write(workdir or cache_dir)
  return paths


def main(argv=None) -> None:
  """`python -m covid3d.data.preprocess DATASET ROOT OUT`: fill a record store.

  Bad input (`--strict`, or a missing partition folder or label file) ends
  the run with one line on stderr, '<prog>: error: <file>: <reason>', and
  exit status 2; scan counts that do not add up, with status 1.
  """
  parser = argparse.ArgumentParser(prog="python -m covid3d.data.preprocess",
                                   description=main.__doc__.splitlines()[0])
  parser.add_argument("dataset", choices=sorted(readers.DATASETS))
  parser.add_argument("root", help="dataset root, a folder or gs://... (docs/data.md)")
  parser.add_argument("out", help="record store, a folder or gs://...: records and "
                      "index.csv go to OUT/DATASET (the layout of --config.data.records_dir), "
                      "skips.json to OUT/DATASET/PARTITION")
  parser.add_argument("--partitions", default=None,
                      help="comma separated (default: train,validation,test for "
                      "cov19ctdb, train otherwise)")
  parser.add_argument("--sizes", default="256,224", help="cube sizes, comma separated")
  parser.add_argument("--dtype", default="float16", choices=RECORD_DTYPES,
                      help="the volumes' dtype (uint8: round(255 v), docs/data.md)")
  parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs)")
  parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  partitions = (args.partitions or ("train,validation,test" if args.dataset == "cov19ctdb"
                                    else "train")).split(",")
  sizes = tuple(int(s) for s in args.sizes.split(","))
  total = SkipLog()
  try:
    for partition in partitions:
      skips = SkipLog()
      refs = readers.DATASETS[args.dataset](args.root, partition, strict=args.strict,
                                            skips=skips)
      build_cache(refs, os.path.join(args.out, args.dataset), sizes, workers=args.workers,
                  strict=args.strict, skips=skips, dtype=args.dtype,
                  workdir=os.path.join(args.out, args.dataset, partition))
      total += skips
  except DataError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
  path = total.write(os.path.join(args.out, args.dataset))
  ledger = total.ledger()
  print(f"{ledger.summary()}\n(all partitions: {path})")
  if not ledger.ok:
    print(f"{parser.prog}: error: " + "; ".join(r.describe() for r in ledger.mismatches()),
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
