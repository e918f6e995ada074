"""Stage ``segmentation``: lesion segmentation on the COVID-19-20 lesion set.

Starts from ``init_from`` (usually the pretrain2d workdir, inflated); the
best checkpoint is chosen by the EMA model's validation Dice.
"""
import numpy as np

from covid3d.data.skips import SkipLog
from covid3d.inference import build
from covid3d.stages import fit, handoff, inputs
from covid3d.train import tasks


def train_fields(config) -> dict:
  """Batch key -> record field of the training batches: volumes and masks."""
  return dict(inputs.batch_fields(config), **inputs.mask_fields(config))


def train_segmentation(config, workdir, source, val_source=None):
  """Trains the segmentation model on ``source`` (records with masks).

  Validation: the held-out share of ``val_source`` when given (all of
  ``source`` is then trained on), else of ``source``; the hold-out is the same
  seeded split (``data.val_fraction``, ``data.fold_seed``) either way, so a
  lesion set gives the segmentation stage's own validation scans.
  """
  model = build.make_model(config, {}, segmentation=True)
  held_out = source if val_source is None else val_source
  train_idx, val_idx = inputs.holdout_split(len(held_out.index), config.data.val_fraction,
                                            config.data.fold_seed)
  if val_source is not None:
    train_idx = np.arange(len(source.index))
  result = fit.fit(config, workdir, model, source, train_idx, val_idx, train_fields(config),
                   tasks.segmentation_task("mask"), output="segmentation", val_source=val_source)
  handoff.mark_trained(workdir, result)
  return result


def run(config, workdir):
  source = inputs.record_source(config, workdir, "lesions", skips=SkipLog())
  return train_segmentation(config, workdir, source)
