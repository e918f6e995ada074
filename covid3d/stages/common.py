"""What the stages share: data preparation, the model, weight hand-off, batches.

A stage's data are preprocessed records (``covid3d.data.preprocess``) in a
cache folder; its model is a ``MultitaskModel`` (3-D) or a ``ConvNeXt``
(2-D); its initial weights come from ``config.init_from``.
"""
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from covid3d import inflation, weights
from covid3d.data import phantom_writers, pipeline, preprocess, readers
from covid3d.data.skips import SkipLog
from covid3d.models import MultitaskModel, variant
from covid3d.train import checkpoint

DONE = "DONE"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")


class HandOffError(ValueError):
  """An input of a stage (an earlier stage's output) is missing or does not fit."""


# ----------------------------------------------------------------------------- data


def dataset_dirs(config: ml_collections.ConfigDict) -> dict:
  """dataset name -> root folder; generates the phantom first when asked."""
  d = config.data
  if d.phantom:
    root = epath.Path(d.phantom_dir)
    if not (root / phantom_writers.MANIFEST).exists():
      logging.info("writing the synthetic phantom (%d scans per dataset) to %s", d.phantom_scans, root)
      n = d.phantom_scans
      phantom_writers.write_all(root, config.seed, {"cov19ctdb": 5 * n, "lesions": n, "stoic": n},
                                workers=max(1, d.workers), sizes=(48, 64), slices=(32, 48))
    return {name: str(root / sub) for name, sub in phantom_writers.DATASET_DIRS.items()}
  return {"cov19ctdb": d.cov19ctdb_dir, "lesions": d.lesions_dir, "stoic": d.stoic_dir}


def cache_dir(config, workdir) -> str:
  """``data.cache_dir``, else beside the phantom, else ``<workdir>/../cache`` (local workdirs)."""
  if config.data.cache_dir:
    return config.data.cache_dir
  if config.data.phantom:
    return os.path.join(config.data.phantom_dir, "cache")
  if "://" in str(workdir):
    raise HandOffError(f"workdir {workdir} is remote: set --config.data.cache_dir to a local folder "
                       "(the preprocessing cache is read with random access)")
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), "cache")


def list_refs(config, dataset: str, partitions: Sequence[str] = ("train",),
              skips: SkipLog | None = None) -> list:
  """The ScanRefs of ``dataset``'s partitions.

  Raises:
    HandOffError: when the dataset folder is not set or does not exist.
  """
  root = dataset_dirs(config)[dataset]
  if not root or not os.path.isdir(root):
    raise HandOffError(
        f"the {dataset} data folder {root!r} does not exist: set --config.data.{dataset}_dir=DIR "
        f"(README: 'Getting the real data'), or run a ':demo' config for the phantom")
  refs = []
  for part in partitions:
    refs += readers.DATASETS[dataset](root, part, strict=config.data.strict, skips=skips)
  return refs


def records(config, workdir, dataset: str, partitions: Sequence[str] = ("train",),
            refs=None) -> pipeline.RecordSource:
  """Preprocessed records of ``dataset`` (cached; built on first use); skips go to the workdir."""
  skips = SkipLog()
  refs = list_refs(config, dataset, partitions, skips) if refs is None else refs
  paths = preprocess.build_cache(refs, os.path.join(cache_dir(config, workdir), dataset),
                                 tuple(config.data.sizes), workers=config.data.workers or None,
                                 strict=config.data.strict, skips=skips, workdir=workdir)
  if not paths:
    raise HandOffError(f"no readable {dataset} scan in {dataset_dirs(config)[dataset]} "
                       f"(see {workdir}/skips.json)")
  return pipeline.file_source(paths)


@dataclasses.dataclass(frozen=True)
class WithMasks(Sequence):
  """Records with their mask fields replaced by pseudo-label files (by scan id)."""
  base: Sequence[Mapping]
  scan_ids: tuple
  mask_files: Mapping[str, str]

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    record = dict(self.base[i])
    with epath.Path(self.mask_files[self.scan_ids[i]]).open("rb") as f, np.load(f) as masks:
      record.update({k: masks[k] for k in masks.files})
    record["has_mask"] = np.int32(1)
    return record


def file_stem(scan_id: str) -> str:
  """A file name for a scan id (COV19-CT-DB ids hold a '/': ``covid/ct_scan_3``)."""
  return scan_id.replace("/", "__")


def with_pseudo_labels(source: pipeline.RecordSource, pseudo_dir: str, dataset: str):
  """``source`` whose masks come from the pseudolabel stage's workdir."""
  folder = epath.Path(pseudo_dir) / "masks" / dataset
  if not folder.is_dir():
    raise HandOffError(
        f"no pseudo-labels for {dataset} in {folder}: run the pseudolabel stage first, e.g. "
        f"python -m covid3d.main --config=configs/pseudolabel.py --workdir={pseudo_dir}")
  ids = tuple(e["scan_id"] for e in source.index)
  present = {p.name for p in folder.iterdir()}
  files = {sid: str(folder / f"{file_stem(sid)}.npz") for sid in ids}
  missing = [sid for sid in ids if f"{file_stem(sid)}.npz" not in present]
  if missing:
    raise HandOffError(f"{len(missing)} scans have no pseudo-label in {folder} (e.g. {missing[0]}); "
                       "rerun the pseudolabel stage on the same data")
  index = tuple(dict(e, has_mask=1) for e in source.index)
  return pipeline.RecordSource(WithMasks(source.records, ids, files), index,
                               f"{source.name} + pseudo-labels {folder}")


def holdout_split(source: pipeline.RecordSource, fraction: float, seed: int):
  """(train indices, validation indices): a seeded random hold-out of records."""
  n = len(source.index)
  order = np.random.default_rng(seed).permutation(n)
  n_val = max(1, int(round(n * fraction))) if n > 1 else 0
  return np.sort(order[n_val:]), np.sort(order[:n_val])


def batch_fields(config, image_only=False, **labels) -> dict:
  """Batch key -> record field: 'image' (input size), 'image_large' (crop source)."""
  big, small = max(config.data.sizes), min(config.data.sizes)
  fields = {"image": f"volume_{small}"}
  if big != small and config.augment.crop.p > 0 and not image_only:
    fields["image_large"] = f"volume_{big}"
  fields.update(labels)
  return fields


def mask_fields(config, image_only=False) -> dict:
  big, small = max(config.data.sizes), min(config.data.sizes)
  fields = {"mask": f"mask_{small}"}
  if "image_large" in batch_fields(config, image_only):
    fields["mask_large"] = f"mask_{big}"
  return fields


def iterators(config, source, train_idx, val_idx, fields, eval_fields=None):
  """(training iterator of host batches, eval-batches factory) over the selected records."""
  t = config.train
  train_iter = iter(pipeline.host_dataset(
      source, train_idx, global_batch_size=t.batch_size, fields=fields, train=True,
      seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      threads=config.data.loader_threads))
  eval_fields = eval_fields or fields

  def eval_batches():
    return host_batches(source, val_idx, t.eval_batch_size, eval_fields, config)

  return train_iter, (eval_batches if len(val_idx) else None)


def host_batches(source, indices, global_batch, fields, config):
  """This process's padded evaluation batches (numpy), every record once."""
  return iter(pipeline.host_dataset(
      source, indices, global_batch_size=global_batch, fields=fields, train=False,
      process_index=jax.process_index(), process_count=jax.process_count(),
      threads=config.data.loader_threads))


# ---------------------------------------------------------------------------- model


def backbone_kwargs(config, spatial_dims=3) -> dict:
  m = config.model
  return dict(variant(m.variant), spatial_dims=spatial_dims, in_chans=1,
              drop_path_rate=m.drop_path_rate, layer_scale_init=m.layer_scale_init,
              dwconv_impl=m.dwconv_impl, remat=m.remat,
              dtype=jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32)


def make_model(config, heads: Mapping[str, int], segmentation: bool) -> MultitaskModel:
  """The 3-D model of a stage: backbone + named heads (+ segmentation head)."""
  return MultitaskModel(backbone=backbone_kwargs(config), heads=dict(heads),
                        segmentation=segmentation, head_hidden=config.model.head_hidden or None,
                        seg_head=dict(config.model.seg_head))


def normalized_apply(model, config):
  """``apply_fn(params, x, deterministic, rngs)`` with the data's mean/std applied on device."""
  mean, std = config.data.mean, config.data.std

  def apply_fn(params, x, deterministic, rngs):
    return model.apply({"params": params}, (x - mean) / std, deterministic=deterministic, rngs=rngs)

  return apply_fn


def init_params(model, config, input_size: int, spatial_dims: int = 3):
  shape = (1,) + (input_size,) * spatial_dims + (1,)
  return jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros(shape))["params"]


def stage_info(workdir) -> dict:
  """The saved config of an earlier stage's workdir."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise HandOffError(f"{workdir} has no config.json: is it the workdir of a finished stage?")
  return json.loads(path.read_text())


def best_params(workdir, ema: bool = True):
  """The best (else latest) EMA parameters of an earlier stage's workdir."""
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.exists():
    raise HandOffError(
        f"no checkpoints in {ckpt_dir}: run that stage first "
        f"(python -m covid3d.main --config=configs/<stage>.py --workdir={workdir})")
  metric = stage_info(workdir).get("train", {}).get("best_metric", "macro_f1")
  ckpt = checkpoint.Checkpointer(str(ckpt_dir), keep=1, best_metric=metric)
  step = ckpt.best_step() or ckpt.latest_step()
  if step is None:
    raise HandOffError(f"{ckpt_dir} holds no finished checkpoint")
  params = ckpt.restore_params(step, ema=ema)
  ckpt.close()
  logging.info("loaded %s parameters of step %d from %s", "EMA" if ema else "raw", step, ckpt_dir)
  return jax.tree.map(np.asarray, params)


def _backbone_of(tree):
  """The backbone subtree of a MultitaskModel or ConvNeXt parameter tree."""
  if "backbone" in tree:
    return tree["backbone"]
  return {k: v for k, v in tree.items() if k.startswith(("stem", "down", "stage"))}


def _is_2d(backbone) -> bool:
  return np.ndim(backbone["stem"]["conv"]["kernel"]) == 4


def load_initial_params(config, params):
  """Replaces parts of freshly initialised 3-D ``params`` from ``config.init_from``.

  The backbone must match exactly (variant, channels); heads whose name or
  shape differ from the source are kept freshly initialised (logged).

  Raises:
    HandOffError: missing source, or a backbone that does not fit.
  """
  src = config.init_from
  if src in ("", "random"):
    logging.info("init_from=random: all weights freshly initialised")
    return params
  if src.endswith(CHECKPOINT_SUFFIXES):
    if not epath.Path(src).exists():
      raise HandOffError(f"init_from checkpoint {src} does not exist")
    source = {"backbone": weights.load_torch_convnext(src, spatial_dims=2)}
  elif epath.Path(src).is_dir():
    source = best_params(src)
  else:
    raise HandOffError(f"init_from={src!r} is neither 'random', a workdir nor a checkpoint file "
                       f"({', '.join(CHECKPOINT_SUFFIXES)})")
  backbone = _backbone_of(source)
  if _is_2d(backbone):
    inf = config.inflation
    logging.info("inflating the 2-D backbone of %s (%s, norm %s)", src, inf.mode, inf.norm)
    backbone = inflation.inflate_params(backbone, inf.mode, inf.norm, new_axis=inf.new_axis)
  check_fits(backbone, params["backbone"], f"backbone weights of {src}",
             f"is config.model.variant={config.model.variant!r} the variant {src} was trained with?")
  out = dict(params)
  out["backbone"] = backbone
  for name in params:
    if name == "backbone":
      continue
    theirs = source.get(name)
    fits = theirs is not None and jax.tree.structure(theirs) == jax.tree.structure(params[name]) and all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(params[name])))
    if fits:
      out[name] = theirs
      logging.info("head %s loaded from %s", name, src)
    else:
      why = "absent in the source" if theirs is None else "shape differs from the source"
      logging.info("head %s re-initialised (%s)", name, why)
  return out


def check_fits(params, like, what: str, hint: str):
  """Raises one HandOffError listing how ``params`` differ from the model's ``like``."""
  try:
    inflation.check_tree(params, like, what)
  except ValueError as e:
    raise HandOffError(f"{e}\n({hint})") from None


def mark_done(workdir, summary: dict | None = None):
  """Writes ``<workdir>/DONE`` (what launch/pipeline.sh checks) with a summary."""
  (epath.Path(workdir) / DONE).write_text(json.dumps(summary or {}, indent=1, default=float))
