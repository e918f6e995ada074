"""Stage ``segmentation``: lesion segmentation on the COVID-19-20 lesion set.

Starts from ``init_from`` (usually the pretrain2d workdir, inflated); the
best checkpoint is chosen by the EMA model's validation Dice.
"""
from covid3d.data.skips import SkipLog
from covid3d.models import build
from covid3d.stages import fit, handoff, inputs
from covid3d.train import tasks


def train_segmentation(config, workdir, source):
  """Trains the segmentation model on ``source`` (records with masks), held-out validation."""
  model = build.make_model(config, {}, segmentation=True)
  train_idx, val_idx = inputs.holdout_split(len(source.index), config.data.val_fraction,
                                            config.data.fold_seed)
  fields = dict(inputs.batch_fields(config), **inputs.mask_fields(config))
  result = fit.fit(config, workdir, model, source, train_idx, val_idx, fields,
                   tasks.segmentation_task("mask"), output="segmentation")
  handoff.mark_done(workdir, {"best_step": result["best_step"], "eval": result["eval"]})
  return result


def run(config, workdir):
  source = inputs.record_source(config, workdir, "lesions", skips=SkipLog())
  return train_segmentation(config, workdir, source)
