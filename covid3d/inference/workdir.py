"""A finished stage's workdir, read only: its saved config, its best parameters, what it predicts.

A finished stage leaves ``config.json`` (written when it starts),
``checkpoints/`` (Orbax; the best EMA parameters are what is handed on and
what inference uses) and ``DONE`` (a JSON summary, written last). Reading
writes nothing: a model folder may be read-only to its user.
"""
import dataclasses
import json
import logging

import jax
import numpy as np
from etils import epath

from covid3d import inflation
from covid3d.train import checkpoint

DONE = "DONE"


class HandOffError(ValueError):
  """An input of a stage (an earlier stage's output) is missing or does not fit."""


@dataclasses.dataclass(frozen=True)
class Target:
  """What a fine-tuning stage predicts: ``label`` the record field, ``class_names`` in label
  order."""
  name: str
  label: str
  class_names: tuple


# The fine-tuning stages (configs/<name>.py) by name, and what their fold models predict.
PREDICTED = {t.name: t for t in (
    Target("severity", "severity", ("mild", "moderate", "severe", "critical")),
    Target("detection", "covid", ("non-covid", "covid")))}
# The stages whose models have a segmentation head: their workdirs can draw lesion masks.
LESION_STAGES = ("segmentation", "segmia", "multitask")


def target(stage: str) -> Target:
  """What the fine-tuning stage ``stage`` (severity or detection) predicts.

  Raises:
    HandOffError: another stage.
  """
  if stage not in PREDICTED:
    raise HandOffError(
        f"stage {stage!r} is not a fine-tuning stage (one of {sorted(PREDICTED)})")
  return PREDICTED[stage]


def stage_info(workdir) -> dict:
  """The saved config of an earlier stage's workdir."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise HandOffError(f"{workdir} has no config.json: is it the workdir of a finished stage?")
  return json.loads(path.read_text())


def checkpoints_dir(workdir) -> epath.Path:
  """``<workdir>/checkpoints``, the parameters an earlier stage hands on.

  Raises:
    HandOffError: a finished stage that writes no checkpoints, or one not run yet.
  """
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.exists() and (epath.Path(workdir) / DONE).exists():
    stage = stage_info(workdir).get("stage") if (epath.Path(workdir) / "config.json").exists() \
        else None
    raise HandOffError(
        f"{workdir} is a finished {stage or 'stage'} workdir, and that stage writes no "
        "checkpoints: give the workdir of a training stage (pretrain2d, segmentation, segmia, "
        "multitask, or a fold of severity/detection)")
  if not ckpt_dir.exists():
    raise HandOffError(
        f"no checkpoints in {ckpt_dir}: run that stage first "
        f"(python -m covid3d.main --config=configs/<stage>.py --workdir={workdir})")
  return ckpt_dir


def best_params(workdir, ema: bool = True):
  """The best (else latest) parameters of an earlier stage's workdir, as host arrays.

  "Best" is by the metric that run selected checkpoints with (``train.best_metric``).
  """
  ckpt_dir = checkpoints_dir(workdir)
  ckpt = checkpoint.Checkpointer.open(str(ckpt_dir))
  step = ckpt.best_step() or ckpt.latest_step()
  if step is None:
    raise HandOffError(f"{ckpt_dir} holds no finished checkpoint")
  params = ckpt.restore_params(step, ema=ema)
  ckpt.close()
  logging.info("loaded %s parameters of step %d from %s", "EMA" if ema else "raw", step, ckpt_dir)
  return jax.tree.map(np.asarray, params)


def check_fits(params, like, what: str, hint: str):
  """Raises one HandOffError listing how ``params`` differ from the model's ``like``."""
  try:
    inflation.check_tree(params, like, what)
  except ValueError as e:
    raise HandOffError(f"{e}\n({hint})") from None
