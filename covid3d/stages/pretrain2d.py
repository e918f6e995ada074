"""Stage ``pretrain2d``: a 2-D one-channel (grayscale) ConvNeXt, the source of inflation.

Three ways, chosen by the config:
* ``init_from`` is a PyTorch ConvNeXt checkpoint (.pth/.safetensors/.npz,
  official or timm naming): imported (RGB stem folded to gray), stored as a
  checkpoint of this workdir, no training.
* ``data.imagenet_dir`` set: trains on grayscale ImageNet, streamed from the
  TFDS ``imagenet2012`` builder (manual dir; array_record, prepared without
  TensorFlow if missing) through ``covid3d.data.imagenet``: random resized
  crops of ``pretrain2d.image_size``, flips, RandAugment, random erasing,
  mixup/CutMix and label smoothing as the official ConvNeXt recipe (the
  ``pretrain2d`` config block); evaluated on ImageNet's ``validation`` split.
* ``data.phantom``: trains on axial slices of the phantom's COV19-CT-DB scans
  (label: covid or not), the laptop stand-in for ImageNet.

As the authors' 2-D model, it has no pre_head (``model.head_hidden=0``); on
ImageNet its input is normalised with ImageNet's statistics
(``pretrain2d.normalise``), and later stages take the raw weights of its best
checkpoint (``pretrain2d.hand_on``; ``handoff.hands_on_ema``).
"""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from covid3d import weights
from covid3d.data import imagenet, schema
from covid3d.inference import build
from covid3d.stages import handoff, inputs
from covid3d.train import checkpoint, loop, optim, state as state_lib, tasks
from covid3d.train.iterators import ArrayIterator

GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma

def phantom_slices(config, workdir):
  """Axial slices of the middle half of each training scan: image (N, s, s, 1), label covid."""
  source = inputs.record_source(config, workdir, "cov19ctdb", ("train",))
  size = min(config.data.sizes)
  images, labels = [], []
  for i, entry in enumerate(source.index):
    volume = schema.decode_volume(source.records[i][f"volume_{size}"])
    picked = volume[size // 4: 3 * size // 4: 2]
    images.append(picked)
    labels += [entry["covid"]] * len(picked)
  return {"image": np.concatenate(images)[..., None], "label": np.asarray(labels, np.int32)}


NORMALISATIONS = ("imagenet", "ct")


def input_normalisation(config) -> tuple[float, float]:
  """(mean, std) of the 2-D model's input in [0, 1] units.

  On ImageNet with ``pretrain2d.normalise='imagenet'``, the authors' (ImageNet's
  RGB statistics, then gray: ``imagenet.gray_normalisation``); otherwise
  ``data.mean``/``data.std``, the CT statistics every 3-D stage uses.
  """
  normalise = config.pretrain2d.normalise
  if normalise not in NORMALISATIONS:
    raise ValueError(f"pretrain2d.normalise must be one of {NORMALISATIONS}, got {normalise!r}")
  if config.data.imagenet_dir and normalise == "imagenet":
    return imagenet.gray_normalisation()
  return config.data.mean, config.data.std


def imagenet_pipeline(config):
  """(train iterator, eval_batches) of grayscale ImageNet, this process's share.

  Training: the ``train`` split (its first ``pretrain2d.max_examples`` images
  if set), augmented, endless; evaluation: the ``validation`` split.
  """
  opt = lambda name: config.pretrain2d[name]
  data_dir = opt("tfds_data_dir") or None
  # Several processes preparing one dataset would race: prepare it first.
  prepare = jax.process_count() == 1
  train_source = imagenet.open_source("train", config.data.imagenet_dir, data_dir, prepare)
  val_source = imagenet.open_source("validation", config.data.imagenet_dir, data_dir, prepare)
  size = config.pretrain2d.image_size
  mean, std = input_normalisation(config)
  transform = imagenet.TrainTransform(
      size=size, random_crop=bool(opt("random_crop")), scale=tuple(opt("crop_scale")),
      ratio=tuple(opt("crop_ratio")), hflip=opt("hflip"), randaugment=opt("randaugment"),
      erase=opt("random_erase"), mean=mean, std=std,
      crop_pct=opt("eval_crop_pct"))
  mixup = imagenet.Mixup(opt("mixup"), opt("cutmix"), opt("mixup_prob"),
                         opt("mixup_switch_prob"), opt("mixup_mode"))
  common = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                threads=config.data.loader_threads, prefetch=opt("prefetch"),
                image_dtype=opt("image_dtype"))
  train = imagenet.train_dataset(
      train_source, global_batch_size=config.train.batch_size, transform=transform,
      mixup=mixup if mixup.active else None, seed=config.train.seed,
      num_records=config.pretrain2d.max_examples or None, workers=opt("loader_workers"),
      **common)
  val = imagenet.eval_dataset(
      val_source, global_batch_size=config.train.eval_batch_size,
      transform=imagenet.EvalTransform(size, opt("eval_crop_pct")),
      num_records=opt("max_eval_examples") or None, **common)
  logging.info("ImageNet: %d training images (%d used), %d validation images (%d used)",
               len(train_source), config.pretrain2d.max_examples or len(train_source),
               len(val_source), opt("max_eval_examples") or len(val_source))
  return iter(train), lambda: iter(val)


def soft_label_task(num_classes: int, label_smoothing: float = 0.0) -> tasks.Task:
  """``tasks.classification_task`` trained with the recipe's loss: smoothed, mixed labels.

  Per example: ``lam * CE_s(label) + (1 - lam) * CE_s(label_mix)`` with
  ``CE_s(y) = (1 - s) * nll(y) + s * mean_k(-log p_k)`` (timm's
  ``SoftTargetCrossEntropy`` of ``mixup_target``, i.e. the target
  ``lam * smooth(y) + (1 - lam) * smooth(y')``, smooth = 1 - s + s/K on the
  class, s/K elsewhere). ``label_mix``/``mix_lam`` absent: lam = 1. Mean over
  the counted examples (labels >= 0, ``valid``); evaluation as the base task.
  """
  base = tasks.classification_task(num_classes, label_key="label")
  s = float(label_smoothing)

  def loss_fn(logits, batch):
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    label = jnp.asarray(batch["label"], jnp.int32)
    other = jnp.asarray(batch["label_mix"], jnp.int32) if "label_mix" in batch else label
    lam = (jnp.asarray(batch["mix_lam"], jnp.float32) if "mix_lam" in batch
           else jnp.ones(label.shape, jnp.float32))
    uniform = -jnp.mean(logp, axis=-1)

    def ce(y):
      nll = -jnp.take_along_axis(logp, jnp.where(y >= 0, y, 0)[:, None], axis=-1)[:, 0]
      return (1.0 - s) * nll + s * uniform

    per_example = lam * ce(label) + (1.0 - lam) * ce(other)
    counted = (label >= 0) & (other >= 0)
    if "valid" in batch:
      counted &= jnp.asarray(batch["valid"], bool)
    w = counted.astype(jnp.float32)
    total = jnp.sum(w)
    loss = jnp.where(total > 0, jnp.sum(w * per_example) / jnp.where(total > 0, total, 1.0), 0.0)
    return loss, total

  return dataclasses.replace(base, loss_fn=loss_fn)


def import_checkpoint(config, workdir):
  """Stores an imported 2-D PyTorch ConvNeXt as this workdir's checkpoint (step 0)."""
  params = weights.load_torch_convnext(config.init_from, spatial_dims=2)
  tx = optim.make_optimizer(config.train)
  state = state_lib.create_state(params, tx, config.train.seed)
  ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), 1, None)
  ckpt.save(0, state, {}, config)
  ckpt.wait()
  ckpt.close()
  logging.info("imported %s into %s", config.init_from, workdir)
  handoff.mark_done(workdir, {"imported": config.init_from})


def _phantom_pipeline(config, workdir):
  """(train iterator, eval_batches, input size) of the phantom slices, held out by holdout_split."""
  data = phantom_slices(config, workdir)
  train_idx, val_idx = inputs.holdout_split(len(data["label"]), config.data.val_fraction,
                                            config.data.fold_seed)
  train = {k: v[train_idx] for k, v in data.items()}
  val = {k: v[val_idx] for k, v in data.items()}
  train_iter = ArrayIterator(train, config.train.batch_size, config.train.seed,
                             jax.process_index(), jax.process_count())

  def eval_batches():
    # Process p evaluates examples p, p + P, ...; every process yields the same
    # number of (possibly short) batches, as the loop's collective step needs.
    count, b = jax.process_count(), config.train.eval_batch_size // jax.process_count()
    mine = {k: v[jax.process_index()::count] for k, v in val.items()}
    n_batches = -(-len(val["label"]) // (count * b))
    return ({k: v[i * b:(i + 1) * b] for k, v in mine.items()} for i in range(n_batches))

  return train_iter, eval_batches, data["image"].shape[1]


def run(config, workdir):
  if config.pretrain2d.hand_on not in ("raw", "ema"):
    raise ValueError("pretrain2d.hand_on must be 'raw' or 'ema', "
                     f"got {config.pretrain2d.hand_on!r}")
  if config.init_from.endswith(weights.CHECKPOINT_SUFFIXES):
    return import_checkpoint(config, workdir)
  on_imagenet = bool(config.data.imagenet_dir)
  if on_imagenet:
    train_iter, eval_batches = imagenet_pipeline(config)
    input_size, num_classes = config.pretrain2d.image_size, imagenet.NUM_CLASSES
    task = soft_label_task(num_classes, config.pretrain2d.label_smoothing)
  elif config.data.phantom:
    train_iter, eval_batches, input_size = _phantom_pipeline(config, workdir)
    num_classes = 2
    task = tasks.classification_task(num_classes, label_key="label")
  else:
    raise handoff.HandOffError(
        "pretrain2d needs --config.data.imagenet_dir=DIR (TFDS manual dir of imagenet2012), "
        "--config.init_from=<2-D ConvNeXt checkpoint>, or a ':demo' config (phantom slices)")
  model = build.make_convnext2d(config, num_classes)
  params = build.init_params(model, config, input_size, spatial_dims=2)
  apply_fn = build.apply_fn(model, config, normalisation=input_normalisation(config))
  if on_imagenet and config.pretrain2d.image_dtype == "uint8":
    normalised = apply_fn  # uint8 batches: to [0, 1] on device first
    apply_fn = lambda p, x, deterministic, rngs: normalised(p, x / 255.0, deterministic, rngs)
  result = loop.train_and_evaluate(config.train, workdir, model, params, train_iter, task,
                                   eval_batches=eval_batches, apply_fn=apply_fn,
                                   stage_config=config)
  handoff.mark_trained(workdir, result)
  return result
