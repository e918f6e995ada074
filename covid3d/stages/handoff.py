"""The hand-off between stages: what one stage leaves in its workdir and the next one checks.

A finished stage leaves ``config.json`` (written when it starts),
``checkpoints/`` (Orbax; the best EMA parameters are what is handed on,
``covid3d.stages.initial_params``, but see ``hands_on_ema``) and ``DONE`` (a
JSON summary, written last); reading them is ``covid3d.inference.workdir``'s,
which inference shares.
``config.init_from`` names where a stage's initial weights come from:
``random``, an earlier stage's workdir, or a checkpoint file; ``stage:NAME``
names the workdir NAME beside the stage's own.
"""
import copy
import json
import shlex

import ml_collections
from etils import epath

from covid3d import inflation, storage, weights
from covid3d.inference.workdir import DONE, HandOffError, checkpoints_dir, stage_info
from covid3d.stages import chain
from covid3d.train import checkpoint, log


def mark_done(workdir, summary: dict | None = None):
  """Writes ``<workdir>/DONE`` (what the launchers check) with a summary."""
  storage.write_json(epath.Path(workdir) / DONE, summary or {}, indent=1, default=float)


def hands_on_ema(workdir) -> bool:
  """Whether ``workdir`` hands on its EMA parameters (else the raw ones).

  Every stage hands on its best EMA parameters, but a ``pretrain2d`` run with
  ``pretrain2d.hand_on='raw'`` its raw ones, as the authors' ImageNet weights
  (the ``'model'`` entry of their checkpoint, not ``'model_ema'``). A workdir
  without ``config.json`` or that setting hands on EMA parameters.
  """
  info = stage_info(workdir) if (epath.Path(workdir) / "config.json").exists() else {}
  return not (info.get("stage") == "pretrain2d"
              and info.get("pretrain2d", {}).get("hand_on", "ema") == "raw")


def best_evaluation(workdir) -> dict:
  """The ``metrics.jsonl`` evaluation row of the checkpoint ``best_params`` hands on.

  One rule for what a stage reports (``DONE``, ``cv.json``) and what it hands on:
  the step the checkpoints record as best (on a tie, the earliest: ``train.best_ties``).
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
    checkpoints_dir(src)   # raises its one line: a finished stage that writes no checkpoints


def inflation_settings(block) -> dict:
  """The fields of an ``inflation`` block (a config's, or one read from config.json) that
  change the inflated weights: ``norm=sum_per_slice`` is ``sum`` except in ``1g``, and the
  Gaussian does not enter ``full``. A field an older config.json lacks takes today's default."""
  mode = block.get("mode", "full")
  norm = block.get("norm", "sum")
  out = {"mode": mode, "new_axis": int(block.get("new_axis", 0)),
         "norm": "sum" if norm == "sum_per_slice" and mode != "1g" else norm}
  if mode != "full":
    out["gaussian"] = block.get("gaussian", "authors")
  return out


def check_inflation(config: ml_collections.ConfigDict) -> None:
  """Stops a stage whose ``inflation`` differs from that its 3-D source workdir was made with.

  A 3-D workdir's weights were inflated when it (or the stage it started from)
  read the 2-D ones; its ``config.json`` records how. The stage's own
  ``inflation`` block then names the inflation it expects (a preset's, or the
  chain's ``--inflation``), and a difference would give its row silently.
  Checked only where the source is a 3-D stage's workdir that did not start
  from random weights (a 2-D source is inflated by this stage; a file records nothing).

  Raises:
    HandOffError: one line naming the source's config.json, both settings and the remedies.
  """
  src = config.get("init_from", "")
  saved = epath.Path(src) / "config.json" if src not in ("", "random") else None
  if saved is None or src.endswith(weights.CHECKPOINT_SUFFIXES) or not saved.exists():
    return
  theirs = json.loads(saved.read_text())
  try:
    is_3d = chain.stage_of(theirs.get("stage", "")).is_3d
  except KeyError:
    return
  if not is_3d or theirs.get("init_from", "random") in ("", "random"):
    return
  made, asked = inflation_settings(theirs.get("inflation", {})), inflation_settings(
      config.inflation)
  differ = [k for k in asked if made.get(k, asked[k]) != asked[k]]   # full has no Gaussian
  if not differ:
    return
  words = lambda settings: ", ".join(f"{k}={settings[k]}" for k in differ)
  flags = lambda settings: " ".join(f"--config.inflation.{k}={settings[k]}" for k in differ)
  raise HandOffError(
      f"{saved} records inflation {words(made)}, but this {config.stage} run asks for "
      f"{words(asked)}: start from a workdir made with {flags(asked)} (launch/ablations.sh "
      f"makes them, named <stage>_<mode>), or give {flags(made)}")


def check_folds_csv(config: ml_collections.ConfigDict) -> None:
  """A fold file given to a fine-tuning run without cross-validation would go unused: stop.

  Raises:
    HandOffError: ``data.folds_csv`` with ``data.folds=1`` (detection authors4/5).
  """
  if config.data.folds_csv and config.data.folds == 1:
    raise HandOffError(
        f"data.folds_csv={config.data.folds_csv} splits the training scans into folds, but "
        "data.folds=1 trains one model on all of them (selected on the validation partition): "
        "drop one of the two")


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


SIBLING = "stage:"


def resolve_siblings(config: ml_collections.ConfigDict, workdir) -> ml_collections.ConfigDict:
  """``config`` with each ``stage:NAME`` of ``init_from`` / ``pseudo_labels`` made a path.

  ``stage:NAME`` is the workdir ``NAME`` beside ``workdir`` (the launchers'
  ``ROOT/<stage>`` layout), so a preset can name its source stage.

  Raises:
    HandOffError: that workdir does not exist; the message names the command that makes it.
  """
  config = copy.deepcopy(config)
  for field in ("init_from", "pseudo_labels"):
    value = config.get(field, "")
    if value.startswith(SIBLING):
      config[field] = str(epath.Path(workdir).parent / value[len(SIBLING):])
      if not epath.Path(config[field]).exists():
        raise HandOffError(f"{field}={value!r} names {config[field]}, which does not exist: "
                           f"{making_command(config[field])}")
  return config


def making_command(sibling: str) -> str:
  """Words that say how the chain makes the workdir ``sibling`` (``ROOT/NAME``)."""
  root, name = str(epath.Path(sibling).parent), epath.Path(sibling).name
  for mode in inflation.MODES:    # NAME_2g: the chain run with --inflation 2g
    for step in chain.steps(root, inflation=mode):
      if step.kind == "stage" and step.output == f"{root}/{name}":
        return f"make it first with {shlex.join(['python', *step.args])}"
  return f"{name} is not a stage of the chain (python -m {chain.PROG} lists them)"
