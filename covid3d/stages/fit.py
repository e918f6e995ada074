"""Training a 3-D stage model: parameters, batches, augmentation, the loop."""
import numpy as np

from covid3d import augment
from covid3d.stages import common
from covid3d.train import loop


def augment_fn(config, has_mask: bool):
  """Per-example augmentation for the train step: ``(key, example) -> example``.

  ``image``/``mask`` are ``(D, H, W, 1)``; ``image_large``/``mask_large``
  (the crop source) are consumed and dropped.
  """
  def fn(key, example):
    squeeze = lambda name: example[name][..., 0] if name in example else None
    volume, mask = augment.augment(
        key, squeeze("image"), squeeze("mask") if has_mask else None, config.augment,
        volume_large=squeeze("image_large"),
        mask_large=squeeze("mask_large") if has_mask else None)
    out = {k: v for k, v in example.items() if not k.endswith("_large")}
    out["image"] = volume[..., None]
    if has_mask:
      out["mask"] = mask[..., None]
    return out

  return fn


class WithRow:
  """Adds ``key``: the same ``row`` for every example, to each batch of a stateful iterator."""

  def __init__(self, iterator, key, row):
    self.iterator, self.key, self.row = iterator, key, np.asarray(row)

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.iterator))
    batch[self.key] = np.broadcast_to(self.row, (len(batch["image"]),) + self.row.shape)
    return batch

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def select_output(apply_fn, key):
  """An apply_fn returning one head's output of a MultitaskModel."""
  if key is None:
    return apply_fn
  return lambda params, x, deterministic, rngs: apply_fn(params, x, deterministic, rngs)[key]


def fit(config, workdir, model, source, train_idx, val_idx, fields, task, *, output=None,
        has_mask=False, train_iter_wrapper=None):
  """Initialises (``config.init_from``) and trains ``model``; returns the loop's result."""
  input_size = min(config.data.sizes)
  params = common.load_initial_params(config, common.init_params(model, config, input_size))
  eval_fields = {k: v for k, v in fields.items() if not k.endswith("_large")}
  train_iter, eval_batches = common.iterators(config, source, train_idx, val_idx, fields,
                                              eval_fields)
  if train_iter_wrapper is not None:
    train_iter = train_iter_wrapper(train_iter)
  apply_fn = select_output(common.normalized_apply(model, config), output)
  return loop.train_and_evaluate(
      config.train, workdir, model, params, train_iter, task, eval_batches=eval_batches,
      augment_fn=augment_fn(config, has_mask), apply_fn=apply_fn, stage_config=config)
