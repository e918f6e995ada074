"""The hand-off between stages: what one stage leaves in its workdir and the next one loads.

A finished stage leaves ``config.json`` (written when it starts),
``checkpoints/`` (Orbax; the best EMA parameters are what is handed on) and
``DONE`` (a JSON summary, written last). ``config.init_from`` names where a
stage's initial weights come from: ``random``, an earlier stage's workdir, or
a 2-D PyTorch ConvNeXt checkpoint file (inflated for 3-D stages).
"""
import collections
import json
import logging

import jax
import ml_collections
import numpy as np
from etils import epath

from covid3d import inflation, weights
from covid3d.train import checkpoint

DONE = "DONE"

# What a fine-tuning stage predicts: the record label and the class names in label order.
Target = collections.namedtuple("Target", ["label", "class_names"])
TARGETS = {"severity": Target("severity", ("mild", "moderate", "severe", "critical")),
           "detection": Target("covid", ("non-covid", "covid"))}


class HandOffError(ValueError):
  """An input of a stage (an earlier stage's output) is missing or does not fit."""


def target(stage: str) -> Target:
  """The fine-tuning target of a ``severity`` or ``detection`` stage."""
  if stage not in TARGETS:
    raise HandOffError(f"stage {stage!r} is not a fine-tuning stage (one of {sorted(TARGETS)})")
  return TARGETS[stage]


def mark_done(workdir, summary: dict | None = None):
  """Writes ``<workdir>/DONE`` (what the launchers check) with a summary."""
  (epath.Path(workdir) / DONE).write_text(json.dumps(summary or {}, indent=1, default=float))


def stage_info(workdir) -> dict:
  """The saved config of an earlier stage's workdir."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise HandOffError(f"{workdir} has no config.json: is it the workdir of a finished stage?")
  return json.loads(path.read_text())


def best_params(workdir, ema: bool = True):
  """The best (else latest) parameters of an earlier stage's workdir, as host arrays.

  "Best" is by the metric that run selected checkpoints with (``train.best_metric``).
  """
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.exists():
    raise HandOffError(
        f"no checkpoints in {ckpt_dir}: run that stage first "
        f"(python -m covid3d.main --config=configs/<stage>.py --workdir={workdir})")
  ckpt = checkpoint.Checkpointer.open(str(ckpt_dir))
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


def _same_shapes(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.shape(x) == np.shape(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def load_initial_params(config: ml_collections.ConfigDict, params):
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
  if src.endswith(weights.CHECKPOINT_SUFFIXES):
    if not epath.Path(src).exists():
      raise HandOffError(f"init_from checkpoint {src} does not exist")
    source = {"backbone": weights.load_torch_convnext(src, spatial_dims=2)}
  elif epath.Path(src).is_dir():
    source = best_params(src)
  else:
    raise HandOffError(f"init_from={src!r} is neither 'random', a workdir nor a checkpoint file "
                       f"({', '.join(weights.CHECKPOINT_SUFFIXES)})")
  backbone = _backbone_of(source)
  if _is_2d(backbone):
    inf = config.inflation
    logging.info("inflating the 2-D backbone of %s (%s, norm %s)", src, inf.mode, inf.norm)
    backbone = inflation.inflate_params(backbone, inf.mode, inf.norm, new_axis=inf.new_axis)
  check_fits(backbone, params["backbone"], f"backbone weights of {src}",
             f"is config.model.variant={config.model.variant!r} the variant {src} was trained with?")
  out = dict(params, backbone=backbone)
  for name in params:
    if name == "backbone":
      continue
    theirs = source.get(name)
    if theirs is not None and _same_shapes(theirs, params[name]):
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
