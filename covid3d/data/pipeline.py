"""grain input pipeline: records -> this process's numpy batches.

Flow (see docs/pipeline.md):

  RecordSource (random access: the cached record files, `file_source`)
    -> select_records: record indices of a fold/split with a known label,
       chosen from the source's index (no volume is read)
    -> grain MapDataset of record indices
       train: shuffle (a new permutation per epoch, from the seed), cut into
              global batches of G indices, remainder dropped, repeated
       eval:  in order, padded with -1 to a multiple of G
    -> host slice: process p keeps positions [p*b, (p+1)*b) of each global
       batch, b = G / process_count
    -> load + convert the b records (reader threads, prefetched)

The training code makes global jax arrays of these host batches
(`covid3d.train.steps.shard_batch`). Every process runs the same index
pipeline from the same seed, so the global batches do not depend on the
number of processes, and the iterator state (the index of the next global
batch) is a small JSON dict.
"""
import dataclasses
import os
from collections.abc import Collection, Mapping, Sequence

import grain
import numpy as np

from covid3d.data import cache
from covid3d.data import preprocess
from covid3d.data import schema
from covid3d.data.host_batch import host_share


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """Random-access records plus their cheap per-record index.

  Attributes:
    records: sequence of record dicts (`len`, `[i]`).
    index: one `schema.index_entry` dict per record, same order, plus its
      'partition' (train, validation, test): a scan is named by
      (partition, scan_id), since ids repeat across partitions.
    name: where the records come from, for error messages.
  """
  records: Sequence[Mapping]
  index: tuple[dict, ...]
  name: str

  def __post_init__(self):
    if len(self.records) != len(self.index):
      raise ValueError(f"{self.name}: {len(self.records)} records but "
                       f"{len(self.index)} index entries")


@dataclasses.dataclass(frozen=True)
class RecordFiles(Sequence):
  """Cached record files, each opened on access with `preprocess.read_record`.

  An item's arrays are memory-mapped when looked up, so a batch reads only
  the fields it batches.
  """
  paths: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i):
    return preprocess.read_record(self.paths[i])


def file_source(paths: Sequence[str]) -> RecordSource:
  """Records from cached record files (`preprocess.build_cache`'s paths).

  The index comes from the `index.csv` of each file's cache folder, so no
  volume is read here.

  Raises:
    ValueError: naming a file its folder's index.csv does not list.
  """
  paths = tuple(str(p) for p in paths)
  rows = {}
  for folder in sorted({os.path.dirname(p) for p in paths}):
    for row in cache.read_index(folder):
      rows[os.path.join(folder, row["file"])] = row
  missing = [p for p in paths if p not in rows]
  if missing:
    raise ValueError(f"{missing[0]} (and {len(missing) - 1} more) not listed "
                     f"in the {cache.INDEX_FILE} of its folder")
  index = tuple({"scan_id": rows[p]["scan_id"], "partition": rows[p]["partition"],
                 **{k: rows[p][k] for k in schema.INT_FIELDS}}
                for p in paths)
  return RecordSource(RecordFiles(paths), index, f"{len(paths)} record files")


def select_records(source: RecordSource, *, label: str | None = None,
                   fold_of: Mapping[str, int] | None = None,
                   folds: Collection[int] | None = None) -> np.ndarray:
  """Indices of the records in some folds that have a known label.

  Args:
    source: the records.
    label: keep only records whose `label` field is >= 0 (None: keep all).
    fold_of: scan_id -> fold (e.g. from `folds.load_or_make_folds`); needed
      with `folds`.
    folds: keep only records of scans in these folds (None: all folds).

  Returns:
    int64 array of record indices, ascending.

  Raises:
    ValueError: for an unknown label name, or a scan missing from `fold_of`.
  """
  if label is not None and label not in schema.LABELS:
    raise ValueError(f"label {label!r} not in {schema.LABELS}")
  if (folds is None) != (fold_of is None):
    raise ValueError("folds and fold_of go together")
  keep = []
  for i, entry in enumerate(source.index):
    if label is not None and entry[label] < 0:
      continue
    if folds is not None:
      sid = entry["scan_id"]
      if sid not in fold_of:
        raise ValueError(f"{source.name}: scan {sid!r} has no fold in the "
                         "fold table")
      if fold_of[sid] not in folds:
        continue
    keep.append(i)
  return np.array(keep, np.int64)


@dataclasses.dataclass(frozen=True)
class _HostSlice:
  """Positions [start, stop) of a global batch of record indices."""
  start: int
  stop: int

  def __call__(self, batch: np.ndarray) -> np.ndarray:
    return batch[self.start:self.stop]


@dataclasses.dataclass(frozen=True)
class _LoadBatch:
  """Reads the records of a host batch of indices into stacked numpy arrays.

  `fields` are (batch key, record field) pairs. Index -1 is padding: the
  `padding` element (by record field), with `valid` False. Volumes become
  `volume_dtype` (`schema.to_numpy`).
  """
  records: Sequence[Mapping]
  fields: tuple[tuple[str, str], ...]
  padding: Mapping[str, np.ndarray] | None
  volume_dtype: str | None

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    names = [f for _, f in self.fields]
    elems = [self.padding if i < 0 else
             schema.to_numpy(self.records[i], names, self.volume_dtype)
             for i in indices.tolist()]
    batch = {key: np.stack([e[f] for e in elems]) for key, f in self.fields}
    batch["valid"] = indices >= 0
    batch["record_index"] = indices.astype(np.int32)
    return batch


def _padding_element(source: RecordSource, index: int, fields: Sequence[str],
                     volume_dtype: str | None) -> dict[str, np.ndarray]:
  """Zeros shaped like record `index`, labels -1."""
  example = schema.to_numpy(source.records[index], fields, volume_dtype)
  return {k: np.full_like(v, -1 if k in schema.LABELS else 0)
          for k, v in example.items()}


def _field_pairs(fields: Sequence[str] | Mapping[str, str]
                 ) -> tuple[tuple[str, str], ...]:
  pairs = tuple(fields.items() if isinstance(fields, Mapping) else
                ((f, f) for f in fields))
  for key, _ in pairs:
    if key in ("valid", "record_index"):
      raise ValueError(f"batch key {key!r} is reserved")
  return pairs


def host_dataset(source: RecordSource, indices: np.ndarray, *,
                 global_batch_size: int,
                 fields: Sequence[str] | Mapping[str, str], train: bool,
                 seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1,
                 threads: int = 4, prefetch: int = 4,
                 volume_dtype: str | None = "float32") -> grain.IterDataset:
  """This process's numpy batches of the selected records.

  Args:
    source: the records.
    indices: record indices to use (from `select_records`).
    global_batch_size: G, the batch summed over all processes.
    fields: record fields to batch (`volume_<s>`, `mask_<s>`, labels,
      `has_mask`), or a mapping batch key -> record field, e.g.
      {'image': 'volume_256', 'label': 'severity'}.
    train: True: shuffled per epoch by `seed` (unless `shuffle` is False),
      last incomplete global batch of each epoch dropped, `num_epochs` epochs
      (None: endless). False: one pass in order, the last global batch padded
      (`valid` False) so every record is seen exactly once.
    seed: shuffle seed, 0 <= seed < 2**32; the same on every process.
    shuffle: False: every training epoch reads ``indices`` in their order.
    num_epochs: training epochs (None: repeat forever); ignored for eval.
    process_index, process_count: this process and the number of processes.
    threads, prefetch: grain reader threads and prefetched batches per
      process (host memory holds about `prefetch` batches).
    volume_dtype: dtype of the batched volumes, in [0, 1]
      (`schema.decode_volume`); None keeps the cached one (float16 or uint8:
      a half or a quarter of the host memory and host-to-device bytes of
      float32, for the device to convert, `covid3d.train.steps`).

  Returns:
    IterDataset of dicts: each field stacked to (b, ...) with b = G /
    process_count (volumes `volume_dtype` (b, s, s, s, 1), masks uint8
    (b, s, s, s, 1), labels int32 (b,), -1 unknown), plus `valid` bool (b,)
    and `record_index` int32 (b,) (-1 for padding). Its iterators have
    JSON-serialisable `get_state()` / `set_state()`.

  Raises:
    ValueError: on a batch size that does not split over the processes, or
      too few records.
  """
  n = len(indices)
  start, per_host = host_share(global_batch_size, n, train=train, process_index=process_index,
                               process_count=process_count,
                               records=f"selected records of {source.name}")
  pairs = _field_pairs(fields)
  indices = np.asarray(indices, np.int64)
  if train:
    ds = grain.MapDataset.source(indices)
    ds = ds.shuffle(seed=seed) if shuffle else ds
    ds = ds.batch(global_batch_size, drop_remainder=True).repeat(num_epochs)
    padding = None
  else:
    pad = -n % global_batch_size
    ds = grain.MapDataset.source(np.concatenate([indices, np.full(pad, -1)]))
    ds = ds.batch(global_batch_size)
    padding = _padding_element(source, int(indices[0]), [f for _, f in pairs],
                               volume_dtype)
  ds = ds.map(_HostSlice(start, start + per_host))
  ds = ds.map(_LoadBatch(source.records, pairs, padding, volume_dtype))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=prefetch))

