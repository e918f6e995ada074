"""ImageNet batches with grain: this process's share of each global batch, augmented.

Train: the record indices shuffled per epoch from the seed (grain's index
shuffle, O(1) memory), cut into global batches, the last incomplete one of
each epoch dropped, repeated; eval: in order, padded to whole global batches.
Each process takes its share of every global batch (``host_batch.host_share``).
"""
import dataclasses
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from covid3d.data.host_batch import host_share
from covid3d.data.imagenet.mixup import Mixup
from covid3d.data.imagenet.transforms import EvalTransform, TrainTransform

# Tags of the seed sequences, so example and batch generators never coincide.
_EXAMPLE, _MIX = 1, 2


def _read(source, indices: Sequence[int]) -> list:
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def _finish(images: list, image_dtype: str) -> np.ndarray:
  x = np.stack(images)[..., None]
  if image_dtype == "uint8":
    return x
  if image_dtype == "float32":
    out = x.astype(np.float32)
    out *= np.float32(1 / 255)
    return out
  raise ValueError(f"image_dtype {image_dtype!r} is not 'float32' or 'uint8'")


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Host batch k (global batch k, this process's positions) -> dict of arrays."""
  source: Sequence[Mapping]
  order: grain.MapDataset           # order[e * N + i]: record of epoch e's position i
  transform: TrainTransform
  mixup: Mixup | None
  seed: int
  num: int                          # N, records per epoch
  global_batch: int                 # G
  per_host: int                     # b
  start: int                        # p * b
  image_dtype: str

  def __call__(self, k: int, _) -> dict:
    per_epoch = self.num // self.global_batch
    epoch, kk = divmod(k, per_epoch)
    first = epoch * self.num + kk * self.global_batch + self.start
    records = [int(self.order[first + j]) for j in range(self.per_host)]
    images, labels = [], []
    for record, example in zip(records, _read(self.source, records), strict=True):
      rng = np.random.default_rng([self.seed, _EXAMPLE, epoch, record])
      images.append(self.transform(example["image"], rng))
      labels.append(example["label"])
    batch = {"image": _finish(images, self.image_dtype),
             "label": np.asarray(labels, np.int32),
             "record_index": np.asarray(records, np.int32)}
    if self.mixup is not None and self.mixup.active:
      batch = self.mixup(batch, np.random.default_rng([self.seed, _MIX, k]),
                         self.global_batch, self.start)
    return batch


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  """Host eval batch k: positions k*G + p*b + [0, b) of the records; past the end: padding."""
  source: Sequence[Mapping]
  indices: np.ndarray
  transform: EvalTransform
  global_batch: int
  per_host: int
  start: int
  image_dtype: str

  def __call__(self, k: int, _) -> dict:
    pos = k * self.global_batch + self.start + np.arange(self.per_host)
    valid = pos < len(self.indices)
    records = self.indices[pos[valid]]
    examples = _read(self.source, records) if len(records) else []
    images = [self.transform(e["image"]) for e in examples]
    images += [np.zeros((self.transform.size,) * 2, np.uint8)] * int((~valid).sum())
    label = np.full(self.per_host, -1, np.int32)
    label[valid] = [e["label"] for e in examples]
    index = np.full(self.per_host, -1, np.int32)
    index[valid] = records
    return {"image": _finish(images, self.image_dtype), "label": label, "valid": valid,
            "record_index": index}


def _iter_dataset(ds: grain.MapDataset, threads: int, prefetch: int,
                  workers: int) -> grain.IterDataset:
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                             prefetch_buffer_size=prefetch))
  if workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read its flags (outside absl.app)
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                       per_worker_buffer_size=1))
  return out


def train_dataset(source: Sequence[Mapping], *, global_batch_size: int,
                  transform: TrainTransform, mixup: Mixup | None = None, seed: int = 0,
                  num_records: int | None = None, num_epochs: int | None = None,
                  process_index: int = 0, process_count: int = 1, threads: int = 4,
                  prefetch: int = 4, workers: int = 0,
                  image_dtype: str = "float32") -> grain.IterDataset:
  """This process's augmented training batches, endless (or `num_epochs` epochs).

  Args:
    source: records {'image': JPEG bytes or an (H, W[, 3]) uint8 array,
      'label': int} (`open_source`).
    global_batch_size: G, summed over processes.
    transform: per-example augmentation.
    mixup: batch mixing (None: none).
    seed: shuffle and augmentation seed, 0 <= seed < 2**32, the same on
      every process.
    num_records: use records [0, num_records) only (None: all).
    num_epochs: None: repeat forever.
    process_index, process_count: this process and the number of processes.
    threads, prefetch: grain reader threads and prefetched batches.
    workers: > 0: also that many grain worker processes (`mp_prefetch`),
      for when the per-example Python work outgrows one process's GIL.
    image_dtype: 'float32' (in [0, 1]) or 'uint8' (0..255: a quarter of the
      host memory and transfer; the model must divide by 255).

  Returns:
    IterDataset of dicts: 'image' (b, S, S, 1), 'label' int32 (b,),
    'record_index' int32 (b,) and, with mixup, 'label_mix' int32 (b,) and
    'mix_lam' float32 (b,) (the target is mix_lam * onehot(label) +
    (1 - mix_lam) * onehot(label_mix)). b = G / process_count. Its iterators
    have JSON-serialisable get_state() / set_state().
  """
  n = len(source) if num_records is None else min(int(num_records), len(source))
  start, per_host = host_share(global_batch_size, n, train=True, process_index=process_index,
                               process_count=process_count, records="images")
  order = grain.MapDataset.source(np.arange(n, dtype=np.int64)).shuffle(seed=seed)
  loader = _TrainBatch(source, order, transform, mixup, seed, n, global_batch_size, per_host,
                       start, image_dtype)
  ds = grain.MapDataset.range(n // global_batch_size).repeat(num_epochs).map_with_index(loader)
  return _iter_dataset(ds, threads, prefetch, workers)


def eval_dataset(source: Sequence[Mapping], *, global_batch_size: int,
                 transform: EvalTransform, num_records: int | None = None,
                 process_index: int = 0, process_count: int = 1, threads: int = 4,
                 prefetch: int = 4, image_dtype: str = "float32") -> grain.IterDataset:
  """One pass over the records in order, this process's share of each global batch.

  The last global batch is padded ('valid' False, label -1, zero image), so
  every process yields ceil(N / G) batches of b = G / process_count and every
  record is seen exactly once.
  """
  n = len(source) if num_records is None else min(int(num_records), len(source))
  start, per_host = host_share(global_batch_size, n, train=False, process_index=process_index,
                               process_count=process_count, records="images")
  loader = _EvalBatch(source, np.arange(n, dtype=np.int64), transform, global_batch_size,
                      per_host, start, image_dtype)
  ds = grain.MapDataset.range(-(-n // global_batch_size)).map_with_index(loader)
  return _iter_dataset(ds, threads, prefetch, 0)
