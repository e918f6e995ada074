"""Stage ``pretrain2d``: a 2-D one-channel (grayscale) ConvNeXt, the source of inflation.

Three ways, chosen by the config:
* ``init_from`` is a PyTorch ConvNeXt checkpoint (.pth/.safetensors/.npz,
  official or timm naming): imported (RGB stem folded to gray), stored as a
  checkpoint of this workdir, no training.
* ``data.imagenet_dir`` set: trains on grayscale ImageNet through the TFDS
  ``imagenet2012`` builder (manual dir), images resized to ``pretrain2d.image_size``.
* ``data.phantom``: trains on axial slices of the phantom's COV19-CT-DB scans
  (label: covid or not), the laptop stand-in for ImageNet.
"""
import logging

import jax
import numpy as np
from etils import epath

from covid3d import weights
from covid3d.models import build
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
    volume = np.asarray(source.records[i][f"volume_{size}"], np.float32)
    picked = volume[size // 4: 3 * size // 4: 2]
    images.append(picked)
    labels += [entry["covid"]] * len(picked)
  return {"image": np.concatenate(images)[..., None], "label": np.asarray(labels, np.int32)}


def imagenet_arrays(config, split, limit=None):
  """Grayscale ImageNet from the TFDS ``imagenet2012`` builder (manual download)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  source = tfds.data_source("imagenet2012", split=split, download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(manual_dir=config.data.imagenet_dir)})
  size = config.pretrain2d.image_size
  n = len(source) if limit is None else min(limit, len(source))
  images = np.empty((n, size, size, 1), np.float32)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    example = source[i]
    gray = np.asarray(example["image"], np.float32) @ GRAY
    images[i, ..., 0] = np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR)) / 255.0
    labels[i] = example["label"]
  return {"image": images, "label": labels}


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


def run(config, workdir):
  if config.init_from.endswith(weights.CHECKPOINT_SUFFIXES):
    return import_checkpoint(config, workdir)
  if config.data.imagenet_dir:
    data = imagenet_arrays(config, "train", config.pretrain2d.max_examples or None)
    num_classes = 1000
  elif config.data.phantom:
    data = phantom_slices(config, workdir)
    num_classes = 2
  else:
    raise handoff.HandOffError(
        "pretrain2d needs --config.data.imagenet_dir=DIR (TFDS manual dir of imagenet2012), "
        "--config.init_from=<2-D ConvNeXt checkpoint>, or a ':demo' config (phantom slices)")
  train_idx, val_idx = inputs.holdout_split(len(data["label"]), config.data.val_fraction,
                                            config.data.fold_seed)
  train = {k: v[train_idx] for k, v in data.items()}
  val = {k: v[val_idx] for k, v in data.items()}
  model = build.make_convnext2d(config, num_classes)
  params = build.init_params(model, config, data["image"].shape[1], spatial_dims=2)
  train_iter = ArrayIterator(train, config.train.batch_size, config.train.seed,
                             jax.process_index(), jax.process_count())

  def eval_batches():
    # Process p evaluates examples p, p + P, ...; every process yields the same
    # number of (possibly short) batches, as the loop's collective step needs.
    count, b = jax.process_count(), config.train.eval_batch_size // jax.process_count()
    mine = {k: v[jax.process_index()::count] for k, v in val.items()}
    n_batches = -(-len(val["label"]) // (count * b))
    return ({k: v[i * b:(i + 1) * b] for k, v in mine.items()} for i in range(n_batches))

  result = loop.train_and_evaluate(config.train, workdir, model, params, train_iter,
                                   tasks.classification_task(num_classes, label_key="label"),
                                   eval_batches=eval_batches, apply_fn=build.apply_fn(model, config),
                                   stage_config=config)
  handoff.mark_done(workdir, {"best_step": result["best_step"], "eval": result["eval"]})
  return result
