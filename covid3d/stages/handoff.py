"""The hand-off between stages: what one stage leaves in its workdir and the next one loads.

A finished stage leaves ``config.json`` (written when it starts),
``checkpoints/`` (Orbax; the best EMA parameters are what is handed on) and
``DONE`` (a JSON summary, written last). ``config.init_from`` names where a
stage's initial weights come from: ``random``, an earlier stage's workdir, or
a 2-D PyTorch ConvNeXt checkpoint file (inflated for 3-D stages).
"""
import collections
import copy
import json
import logging

import jax
import ml_collections
import numpy as np
from etils import epath

from covid3d import inflation, storage, weights
from covid3d.train import checkpoint, log

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
  storage.write_json(epath.Path(workdir) / DONE, summary or {}, indent=1, default=float)


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
  ckpt = checkpoint.Checkpointer.open(str(ckpt_dir))
  step = ckpt.best_step() or ckpt.latest_step()
  if step is None:
    raise HandOffError(f"{ckpt_dir} holds no finished checkpoint")
  params = ckpt.restore_params(step, ema=ema)
  ckpt.close()
  logging.info("loaded %s parameters of step %d from %s", "EMA" if ema else "raw", step, ckpt_dir)
  return jax.tree.map(np.asarray, params)


def best_evaluation(workdir) -> dict:
  """The ``metrics.jsonl`` evaluation row of the checkpoint ``best_params`` hands on.

  One rule for what a stage reports (``DONE``, ``cv.json``) and what it hands on:
  the step the checkpoints record as best (on a tie, whichever Orbax keeps).
  """
  ckpt = checkpoint.Checkpointer.open(str(epath.Path(workdir) / "checkpoints"))
  step = ckpt.best_step()
  ckpt.close()
  rows = log.read_metrics(workdir)
  at_best = [r for r in rows if r.get("split") == "eval" and r["step"] == step]
  if not at_best:
    raise HandOffError(f"{workdir}: no evaluation of the best checkpoint (step {step}) in "
                       "metrics.jsonl")
  return at_best[-1]


def mark_trained(workdir, result: dict):
  """``DONE`` of a training stage: its best step and that step's evaluation."""
  mark_done(workdir, {"best_step": result["best_step"], "last_step": result["step"],
                      "best_eval": best_evaluation(workdir)})


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


def _classification_heads(tree) -> dict:
  """name -> classification head subtree.

  ``head_<name>`` of a MultitaskModel, ``head`` of a ConvNeXt.
  """
  return {k: v for k, v in tree.items() if k == "head" or k.startswith("head_")}


def read_source(src: str, slice_axis: str = "first"):
  """The parameter tree ``init_from`` names: a workdir's best EMA parameters, or a checkpoint file.

  A file may be an official/timm ConvNeXt (2-D or 3-D) or any of the authors'
  files (``weights.load_authors_checkpoint``; EMA weights); ``slice_axis='last'``
  maps weights trained on slice-last volumes (the authors' pretrainings).
  """
  check_source(src)
  if src.endswith(weights.CHECKPOINT_SUFFIXES):
    tree = weights.load_authors_checkpoint(src, slice_axis=slice_axis)
    if isinstance(tree, list):
      raise HandOffError(
          f"{src} holds {len(tree)} fold models (a submission file): convert it with "
          f"python -m covid3d.authors convert {src} OUT, then use init_from=OUT/fold<k> "
          "(or predict with init_from=OUT)")
    return tree
  return best_params(src)


def check_source(src: str) -> None:
  """Cheap checks of an ``init_from`` before a stage's expensive work (data, compilation).

  Raises:
    HandOffError: a missing file or folder, or a workdir that holds no checkpoints.
  """
  if src in ("", "random"):
    return
  path = epath.Path(src)
  if src.endswith(weights.CHECKPOINT_SUFFIXES):
    if not path.exists():
      raise HandOffError(f"init_from checkpoint {src} does not exist")
    return
  if not path.is_dir():
    raise HandOffError(f"init_from={src!r} is neither 'random', a workdir nor a checkpoint "
                       f"file ({', '.join(weights.CHECKPOINT_SUFFIXES)})")
  if not (path / "checkpoints").exists() and (path / DONE).exists():
    best_params(src)   # raises its one line: a finished stage that writes no checkpoints


def check_pseudo_labels(pseudo_dir: str, stage: str) -> None:
  """Cheap checks of ``pseudo_labels`` before a stage that trains on them does its work.

  Raises:
    HandOffError: none given, or a folder that holds no pseudo-labels.
  """
  if not pseudo_dir:
    raise HandOffError(f"{stage} trains on pseudo-labels: give --config.pseudo_labels=<the "
                       "workdir of the pseudolabel stage>")
  if not (epath.Path(pseudo_dir) / "masks").is_dir():
    raise HandOffError(
        f"no pseudo-labels in {pseudo_dir}: run the pseudolabel stage first "
        f"(python -m covid3d.main --config=configs/pseudolabel.py --workdir={pseudo_dir})")


def merge_source(source, params, config: ml_collections.ConfigDict, what: str):
  """Freshly initialised 3-D ``params`` with the parts of ``source`` that carry over.

  * The backbone is taken whole (inflated when ``source`` is 2-D) and must fit exactly.
  * A head of the same name and shapes is taken whole (e.g. reloading a fold).
  * Otherwise, with ``config.model.head_init='carry'`` (the authors' fine-tuning),
    a classification head takes its LayerNorm ``norm`` and ``pre_head`` from the
    source's single classification head where the shapes fit, and keeps its
    fresh classifier ``fc`` (another class count); ``'fresh'`` re-initialises
    every head the source does not hold under the same name. Each choice is logged.

  Raises:
    HandOffError: a backbone that does not fit.
  """
  backbone = _backbone_of(source)
  if _is_2d(backbone):
    inf = config.inflation
    logging.info("inflating the 2-D backbone of %s (%s, norm %s, %s Gaussian)", what, inf.mode,
                 inf.norm, inf.gaussian)
    backbone = inflation.inflate_params(backbone, inf.mode, inf.norm, new_axis=inf.new_axis,
                                        gaussian=inf.gaussian)
  check_fits(backbone, params["backbone"], f"backbone weights of {what}",
             f"is config.model.variant={config.model.variant!r} "
             f"the variant {what} was trained with?")
  out = dict(params, backbone=backbone)
  theirs_heads = _classification_heads(source)
  for name in params:
    if name == "backbone":
      continue
    theirs = source.get(name)
    if theirs is not None and _same_shapes(theirs, params[name]):
      out[name] = theirs
      logging.info("head %s loaded from %s", name, what)
      continue
    donor = next(iter(theirs_heads.values())) if len(theirs_heads) == 1 else None
    if config.model.head_init == "carry" and name.startswith("head_") and donor is not None:
      carried = {k: donor[k] for k in ("norm", "pre_head")
                 if k in donor and k in params[name] and _same_shapes(donor[k], params[name][k])}
      if carried:
        out[name] = dict(params[name], **carried)
        logging.info("head %s: %s loaded from %s's %s, the rest re-initialised", name,
                     " and ".join(sorted(carried)), what, next(iter(theirs_heads)))
        continue
    why = "absent in the source" if theirs is None else "shape differs from the source"
    logging.info("head %s re-initialised (%s)", name, why)
  return out


SIBLING = "stage:"


def resolve_siblings(config: ml_collections.ConfigDict, workdir) -> ml_collections.ConfigDict:
  """``config`` with each ``stage:NAME`` of ``init_from`` / ``pseudo_labels`` made a path.

  ``stage:NAME`` is the workdir ``NAME`` beside ``workdir`` (the launchers'
  ``ROOT/<stage>`` layout), so a preset can name its source stage.
  """
  config = copy.deepcopy(config)
  for field in ("init_from", "pseudo_labels"):
    value = config.get(field, "")
    if value.startswith(SIBLING):
      config[field] = str(epath.Path(workdir).parent / value[len(SIBLING):])
  return config


def load_initial_params(config: ml_collections.ConfigDict, params):
  """Freshly initialised 3-D ``params`` with what carries over from ``config.init_from``.

  ``init_from``: 'random' (``params`` as they are), an earlier stage's workdir
  or a 2-D checkpoint file; see ``merge_source`` for what is taken.

  Raises:
    HandOffError: missing source, or a backbone that does not fit.
  """
  src = config.init_from
  if src in ("", "random"):
    logging.info("init_from=random: all weights freshly initialised")
    return params
  return merge_source(read_source(src, config.init_from_slice_axis), params, config, src)


def check_fits(params, like, what: str, hint: str):
  """Raises one HandOffError listing how ``params`` differ from the model's ``like``."""
  try:
    inflation.check_tree(params, like, what)
  except ValueError as e:
    raise HandOffError(f"{e}\n({hint})") from None
