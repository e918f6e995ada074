"""Stage ``segmentation``: lesion segmentation on the COVID-19-20 lesion set.

Starts from ``init_from`` (usually the pretrain2d workdir, inflated); the
best checkpoint is chosen by the EMA model's validation Dice.
"""
from covid3d.stages import common, fit
from covid3d.train import tasks


def train_segmentation(config, workdir, source):
  """Trains the segmentation model on ``source`` (records with masks), held-out validation."""
  model = common.make_model(config, {}, segmentation=True)
  train_idx, val_idx = common.holdout_split(source, config.data.val_fraction, config.data.fold_seed)
  fields = dict(common.batch_fields(config), **common.mask_fields(config))
  result = fit.fit(config, workdir, model, source, train_idx, val_idx, fields,
                   tasks.segmentation_task("mask"), output="segmentation", has_mask=True)
  common.mark_done(workdir, {"best_step": result["best_step"], "eval": result["eval"]})
  return result


def run(config, workdir):
  return train_segmentation(config, workdir, common.records(config, workdir, "lesions"))
