"""A stage's data: dataset folders, preprocessed records, pseudo-labels, splits and batches.

A stage reads preprocessed records (``covid3d.data.preprocess``, stored in
``records_store``: ``data.records_dir``, shared by every process, or the cache
root's ``records/<dataset>``) as a ``pipeline.RecordSource``, picks
training and validation records, and reads them as this process's numpy
batches (``pipeline.host_dataset``), each record's arrays memory-mapped and only
the fields batched. Batch keys: ``image`` (the model input, ``(b, S, S, S, 1)``:
training batches as cached, ``data.record_dtype``, for the train step to
convert on the devices; evaluation batches float32 in [0, 1]), ``image_large``
(the crop source, when cropping), ``mask``/``mask_large`` (uint8), labels by
name, ``valid`` and ``record_index``.
"""
import collections
import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from covid3d import cachedir, storage
from covid3d.data import cache, phantom_writers, pipeline, preprocess, readers
from covid3d.data.skips import SkipLog
from covid3d.stages.handoff import HandOffError


def dataset_dirs(config: ml_collections.ConfigDict) -> dict:
  """dataset name -> root folder; generates the phantom first when asked.

  With several processes, process 0 writes the phantom first and the others
  wait for it, so processes that share a disk (a pod rehearsed on one
  machine) do not write the same files at once; a host with a disk of its
  own then writes its own copy, the same scans from the same seed.
  """
  d = config.data
  if not d.phantom:
    return {"cov19ctdb": d.cov19ctdb_dir, "lesions": d.lesions_dir, "stoic": d.stoic_dir}
  root = epath.Path(d.phantom_dir)
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      _write_phantom_if_missing(config, root)
    multihost_utils.sync_global_devices(f"covid3d phantom {root}")
  _write_phantom_if_missing(config, root)
  return {name: str(root / sub) for name, sub in phantom_writers.DATASET_DIRS.items()}


def _write_phantom_if_missing(config: ml_collections.ConfigDict, root: epath.Path):
  d = config.data
  if not (root / phantom_writers.MANIFEST).exists():
    logging.info("writing the synthetic phantom (%d scans per dataset) to %s",
                 d.phantom_scans, root)
    n = d.phantom_scans
    phantom_writers.write_all(root, config.seed, {"cov19ctdb": 5 * n, "lesions": n, "stoic": n},
                              workers=max(1, d.workers), sizes=(48, 64), slices=(32, 48))


def list_refs(config, dataset: str, partitions: Sequence[str] = ("train",),
              skips: SkipLog | None = None) -> list:
  """The ScanRefs of ``dataset``'s partitions.

  Raises:
    HandOffError: when the dataset folder is not set or does not exist.
  """
  root = dataset_dirs(config)[dataset]
  if not root or not storage.as_path(root).is_dir():
    raise HandOffError(
        f"the {dataset} data folder {root!r} does not exist: set --config.data.{dataset}_dir=DIR "
        f"(README: 'Getting the real data'), or run a ':demo' config for the phantom")
  refs = []
  for part in partitions:
    refs += readers.DATASETS[dataset](root, part, strict=config.data.strict, skips=skips)
  return refs


def records_store(config, dataset: str) -> tuple[str, bool]:
  """(the folder of ``dataset``'s records, whether every process shares it).

  ``data.records_dir`` set (a folder every host sees, or ``gs://``): one store
  for the pod, ``<records_dir>/<dataset>``, each record built by one process.
  Unset: ``records/<dataset>`` under this host's cache root, built whole by
  each process.
  """
  if config.data.records_dir:
    return f"{str(config.data.records_dir).rstrip('/')}/{dataset}", True
  return cachedir.path("records", dataset), False


def record_source(config, workdir, dataset: str, partitions: Sequence[str] = ("train",),
                  refs=None, skips: SkipLog | None = None) -> pipeline.RecordSource:
  """Preprocessed records of ``dataset`` (cached; built on first use).

  ``skips``: the stage's one skip report (``SkipLog``), shared by all its
  datasets and partitions; ``<workdir>/skips.json`` is rewritten with all of it
  (every skip with its reason, and the ledger of scans offered, used and
  skipped per dataset and partition). ``refs``: already listed into ``skips``.
  """
  skips = SkipLog() if skips is None else skips
  refs = list_refs(config, dataset, partitions, skips) if refs is None else refs
  store, shared = records_store(config, dataset)
  share = (jax.process_index(), jax.process_count()) if shared else (0, 1)
  paths = preprocess.build_cache(refs, store, tuple(config.data.sizes),
                                 workers=config.data.workers or None, strict=config.data.strict,
                                 skips=skips, workdir=workdir, share=share,
                                 sync=multihost_utils.sync_global_devices,
                                 dtype=config.data.record_dtype)
  if not paths:
    raise HandOffError(f"no readable {dataset} scan in {dataset_dirs(config)[dataset]} "
                       f"(see {workdir}/skips.json)")
  return pipeline.file_source(paths)


@dataclasses.dataclass(frozen=True)
class WithMasks(Sequence):
  """Records with their mask fields replaced by pseudo-label files (one per record)."""
  base: Sequence[Mapping]
  mask_files: tuple[str, ...]

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    with epath.Path(self.mask_files[i]).open("rb") as f:
      masks = cache.read_npz(f)
    # The base record's arrays stay unread until looked up.
    return collections.ChainMap({**masks, "has_mask": np.int32(1)}, self.base[i])


def file_stem(entry: Mapping) -> str:
  """A file name for a record's scan, unique within its dataset: ``<partition>__<scan id>``.

  Scan ids repeat across partitions (``train/covid/ct_scan_0`` and
  ``validation/covid/ct_scan_0`` are two scans), and COV19-CT-DB ids hold a '/'.
  """
  return f"{entry['partition']}__{entry['scan_id'].replace('/', '__')}"


def with_pseudo_labels(source: pipeline.RecordSource, pseudo_dir: str, dataset: str):
  """``source`` whose masks come from the pseudolabel stage's workdir."""
  folder = epath.Path(pseudo_dir) / "masks" / dataset
  if not folder.is_dir():
    raise HandOffError(
        f"no pseudo-labels for {dataset} in {folder}: run the pseudolabel stage first, e.g. "
        f"python -m covid3d.main --config=configs/pseudolabel.py --workdir={pseudo_dir}")
  present = {p.name for p in folder.iterdir()}
  names = tuple(f"{file_stem(e)}.npz" for e in source.index)
  missing = [name for name in names if name not in present]
  if missing:
    raise HandOffError(f"{len(missing)} scans have no pseudo-label in {folder} "
                       f"(e.g. {missing[0]}); rerun the pseudolabel stage on the same data")
  index = tuple(dict(e, has_mask=1) for e in source.index)
  return pipeline.RecordSource(WithMasks(source.records, tuple(str(folder / n) for n in names)),
                               index, f"{source.name} + pseudo-labels {folder}")


def holdout_split(n: int, fraction: float, seed: int):
  """(train indices, validation indices) of ``n`` examples: a seeded random hold-out, sorted."""
  order = np.random.default_rng(seed).permutation(n)
  n_val = max(1, int(round(n * fraction))) if n > 1 else 0
  return np.sort(order[n_val:]), np.sort(order[:n_val])


def authors_holdout(scan_ids: Sequence[str], fraction: float, seed: int = 42):
  """The authors' hold-out of ``scan_ids``: (train indices, validation indices), in their order.

  Their pretraining datasets sort the scans by name, shuffle that list with
  Python's ``random.Random(seed).shuffle`` and train on the first
  ``int((1 - fraction) * n)`` (lesion set: ``int(0.85 n)``; STOIC: ``int(0.70 n)``).
  The indices (into ``scan_ids``) keep that shuffled order: the order their
  unshuffled loaders read.
  """
  order = sorted(range(len(scan_ids)), key=lambda i: scan_ids[i])
  random.Random(seed).shuffle(order)
  n_train = int((1 - fraction) * len(order))
  return np.asarray(order[:n_train], np.int64), np.asarray(order[n_train:], np.int64)


def stage_holdout(config, index: Sequence[Mapping], fraction: float, among=None):
  """(train, validation) record indices of a pretraining stage's hold-out of ``index``.

  ``config.data.holdout``: 'authors' (``authors_holdout`` with
  ``data.holdout_seed``) or 'seeded' (``holdout_split`` with ``data.fold_seed``).
  ``among``: the record indices to split (None: all).
  """
  among = np.arange(len(index)) if among is None else np.asarray(among, np.int64)
  method = config.data.holdout
  if method == "authors":
    train, val = authors_holdout([index[i]["scan_id"] for i in among], fraction,
                                 config.data.holdout_seed)
  elif method == "seeded":
    train, val = holdout_split(len(among), fraction, config.data.fold_seed)
  else:
    raise ValueError(f"data.holdout must be 'authors' or 'seeded', got {method!r}")
  return among[train], among[val]


def batch_fields(config, image_only=False, **labels) -> dict:
  """Batch key -> record field: 'image' (input size), 'image_large' (crop source), labels."""
  big, small = max(config.data.sizes), min(config.data.sizes)
  fields = {"image": f"volume_{small}"}
  if big != small and config.augment.crop.p > 0 and not image_only:
    fields["image_large"] = f"volume_{big}"
  fields.update(labels)
  return fields


def mask_fields(config, image_only=False) -> dict:
  """Batch key -> record field of the masks, matching ``batch_fields``."""
  big, small = max(config.data.sizes), min(config.data.sizes)
  fields = {"mask": f"mask_{small}"}
  if "image_large" in batch_fields(config, image_only):
    fields["mask_large"] = f"mask_{big}"
  return fields


def iterators(config, source, train_idx, val_idx, fields, eval_fields=None, val_source=None):
  """(training iterator of host batches, eval-batches factory) over the selected records.

  ``val_idx`` selects from ``val_source`` when given (validation on another
  dataset), else from ``source``.
  """
  t = config.train
  # Volumes stay as cached (float16 or uint8): the train step converts them on the devices.
  train_iter = iter(pipeline.host_dataset(
      source, train_idx, global_batch_size=t.batch_size, fields=fields, train=True,
      seed=t.seed, shuffle=t.shuffle, process_index=jax.process_index(),
      process_count=jax.process_count(), threads=config.data.loader_threads, volume_dtype=None))
  eval_fields = eval_fields or fields

  def eval_batches():
    return host_batches(source if val_source is None else val_source, val_idx,
                        t.eval_batch_size, eval_fields, config)

  return train_iter, (eval_batches if len(val_idx) else None)


def host_batches(source, indices, global_batch, fields, config):
  """This process's padded evaluation batches (numpy) of its share of ``indices``."""
  return iter(pipeline.host_dataset(
      source, indices, global_batch_size=global_batch, fields=fields, train=False,
      process_index=jax.process_index(), process_count=jax.process_count(),
      threads=config.data.loader_threads))
