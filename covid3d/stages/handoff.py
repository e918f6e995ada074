"""The hand-off between stages: what one stage leaves in its workdir and the next one checks.

A finished stage leaves ``config.json`` (written when it starts),
``checkpoints/`` (Orbax; the best EMA parameters are what is handed on,
``covid3d.stages.initial_params``) and ``DONE`` (a JSON summary, written last);
reading them is ``covid3d.inference.workdir``'s, which inference shares.
``config.init_from`` names where a stage's initial weights come from:
``random``, an earlier stage's workdir, or a checkpoint file; ``stage:NAME``
names the workdir NAME beside the stage's own.
"""
import copy
import shlex

import ml_collections
from etils import epath

from covid3d import storage, weights
from covid3d.inference.workdir import DONE, HandOffError, checkpoints_dir
from covid3d.stages import chain
from covid3d.train import checkpoint, log


def mark_done(workdir, summary: dict | None = None):
  """Writes ``<workdir>/DONE`` (what the launchers check) with a summary."""
  storage.write_json(epath.Path(workdir) / DONE, summary or {}, indent=1, default=float)


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
  for step in chain.steps(root):
    if step.kind == "stage" and step.output == f"{root}/{name}":
      return f"make it first with {shlex.join(['python', *step.args])}"
  return f"{name} is not a stage of the chain (python -m {chain.PROG} lists them)"
