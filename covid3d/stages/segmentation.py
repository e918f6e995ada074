"""Stage ``segmentation``: lesion segmentation on the COVID-19-20 lesion set.

Starts from ``init_from`` (usually the pretrain2d workdir, inflated); the
best checkpoint is chosen by the EMA model's validation Dice. Also what
segmia and multitask hand on (``hand_on``): with ``handoff.lesion_finetune``
their student, fine-tuned on the lesion set.
"""
import copy
import json

import numpy as np
from etils import epath

from covid3d.data.skips import SkipLog
from covid3d.inference import build
from covid3d.stages import fit, handoff, inputs
from covid3d.train import tasks

STUDENT = "student"


def train_fields(config) -> dict:
  """Batch key -> record field of the training batches: volumes and masks."""
  return dict(inputs.batch_fields(config), **inputs.mask_fields(config))


def lesion_split(config, lesions):
  """(train, validation) indices of the lesion set: ``data.lesion_val_fraction`` held out."""
  return inputs.stage_holdout(config, lesions.index, config.data.lesion_val_fraction)


def train_segmentation(config, workdir, source, val_source=None, model=None, fraction=None):
  """Trains the segmentation model on ``source`` (records with masks); writes ``DONE``.

  Validation: the lesion hold-out (``lesion_split``) of ``val_source`` when
  given (a lesion set; all of ``source`` is then trained on), else a hold-out
  of ``source``: ``fraction`` of it (default ``data.lesion_val_fraction``,
  ``source`` being the lesion set), so a lesion set gives the segmentation
  stage's own validation scans either way. ``model``: default the
  segmentation model.
  """
  if model is None:
    model = build.make_model(config, {}, segmentation=True)
  if val_source is not None:
    train_idx, val_idx = every_record(config, source), lesion_split(config, val_source)[1]
  else:
    train_idx, val_idx = inputs.stage_holdout(
        config, source.index, config.data.lesion_val_fraction if fraction is None else fraction)
  result = fit.fit(config, workdir, model, source, train_idx, val_idx, train_fields(config),
                   tasks.segmentation_task("mask"), output="segmentation", val_source=val_source)
  handoff.mark_trained(workdir, result)
  return result


def every_record(config, source):
  """All of ``source``'s indices, in the authors' order with ``data.holdout=authors``.

  Their segmia dataset shuffles its name-sorted list once with
  ``random.Random(42)`` and reads it in that order when unshuffled.
  """
  if config.data.holdout != "authors":
    return np.arange(len(source.index))
  return inputs.authors_holdout([inputs.file_stem(e) for e in source.index], 0.0,
                                config.data.holdout_seed)[0]


def hand_on(config, workdir, train_student, model, skips: SkipLog):
  """What segmia and multitask hand on; returns the last training's result.

  ``train_student(dir)`` trains the stage's student in ``dir`` and writes its
  ``DONE``. With ``handoff.lesion_finetune`` (the authors') that is
  ``<workdir>/student`` (skipped when done), and the student's best EMA
  parameters (``model``'s, every head kept) are then fine-tuned in ``workdir``
  on the lesion set's training scans, validated on its hold-out: learning rate
  times ``handoff.learning_rate_factor``, ``handoff.num_epochs`` epochs (0:
  half the stage's steps), best by EMA Dice, batches shuffled as their lesion
  loader. ``DONE`` holds the fine-tune's best and the student's ``DONE``.
  """
  if not config.handoff.lesion_finetune:
    return train_student(workdir)
  student = str(epath.Path(workdir) / STUDENT)
  if not (epath.Path(student) / handoff.DONE).exists():
    train_student(student)
  h, ft = config.handoff, copy.deepcopy(config)
  ft.init_from = student
  ft.train.learning_rate = config.train.learning_rate * h.learning_rate_factor
  ft.train.best_metric = "dice"
  ft.train.shuffle = True
  ft.train.num_epochs = h.num_epochs
  ft.train.eval_every_epochs = 1.0 if h.num_epochs else 0.0
  ft.train.num_steps = max(1, config.train.num_steps // 2)
  lesions = inputs.record_source(config, workdir, "lesions", skips=skips)
  train_idx, val_idx = lesion_split(config, lesions)
  fields = dict(inputs.batch_fields(config), **inputs.mask_fields(config))
  result = fit.fit(ft, workdir, model, lesions, train_idx, val_idx, fields,
                   tasks.segmentation_task("mask"), output="segmentation")
  handoff.mark_done(workdir, {
      "best_step": result["best_step"], "last_step": result["step"],
      "best_eval": handoff.best_evaluation(workdir),
      "student": json.loads((epath.Path(student) / handoff.DONE).read_text())})
  return result


def run(config, workdir):
  source = inputs.record_source(config, workdir, "lesions", skips=SkipLog())
  return train_segmentation(config, workdir, source)
