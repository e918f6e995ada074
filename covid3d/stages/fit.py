"""Training a 3-D stage's model: initial weights, batches, augmentation, the training loop."""
import functools

import numpy as np

from covid3d import augment
from covid3d.inference import build
from covid3d.stages import initial_params, inputs
from covid3d.train import loop


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


def fit(config, workdir, model, source, train_idx, val_idx, fields, task, *, output=None,
        train_iter_wrapper=None, val_source=None):
  """Initialises (``config.init_from``) and trains ``model``; returns the loop's result.

  ``val_idx`` indexes ``val_source`` when given (e.g. real lesion masks while
  training on pseudo-labels), else ``source``.
  """
  input_size = min(config.data.sizes)
  params = initial_params.load_initial_params(config, build.init_params(model, config, input_size))
  eval_fields = {k: v for k, v in fields.items() if not k.endswith("_large")}
  train_iter, eval_batches = inputs.iterators(config, source, train_idx, val_idx, fields,
                                              eval_fields, val_source)
  if train_iter_wrapper is not None:
    train_iter = train_iter_wrapper(train_iter)
  return loop.train_and_evaluate(
      config.train, workdir, model, params, train_iter, task, eval_batches=eval_batches,
      augment_fn=functools.partial(
          augment.augment_example,
          config=augment.resolve_noise_space(config.augment, config.data.mean, config.data.std)),
      apply_fn=build.apply_fn(model, config, output), stage_config=config,
      num_records=len(train_idx))
