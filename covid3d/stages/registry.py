"""Which code runs each stage: the ``STAGES`` table, and ``run`` that dispatches on it.

``run`` refuses a workdir that holds a run with other settings (``changed_fields``);
``python -m covid3d.main --overwrite`` deletes such a run first.
"""
import json

import jax
import ml_collections
from etils import epath

from covid3d.stages import (finetune, handoff, multitask, predict, pretrain2d, pseudolabel,
                            segmentation, segmia)

# config.stage -> run(config, workdir). severity and detection are one fine-tuning
# stage with two targets (handoff.TARGETS).
STAGES = {
    "pretrain2d": pretrain2d.run,
    "segmentation": segmentation.run,
    "pseudolabel": pseudolabel.run,
    "segmia": segmia.run,
    "multitask": multitask.run,
    "severity": finetune.run,
    "detection": finetune.run,
    "predict": predict.run,
}


def run(config: ml_collections.ConfigDict, workdir: str):
  """Runs the stage ``config.stage`` in ``workdir``, after saving the config there.

  A workdir that already holds work keeps its ``config.json``, and the stage
  resumes it (skipping what is done) when the settings agree; otherwise
  HandOffError names the changed fields.

  ``stage:NAME`` sources are first resolved to the workdir ``NAME`` beside ``workdir``.
  """
  if config.stage not in STAGES:
    raise handoff.HandOffError(f"config.stage={config.stage!r} is not one of {sorted(STAGES)}")
  config = handoff.resolve_siblings(config, workdir)
  saved = epath.Path(workdir) / "config.json"
  if holds_results(workdir):
    changed = changed_fields(json.loads(saved.read_text()), config)
    if changed:
      raise handoff.HandOffError(
          f"{workdir} holds a run with other settings ({'; '.join(changed[:6])}"
          f"{'; ...' if len(changed) > 6 else ''}): use another --workdir, or --overwrite to "
          "delete that run and start afresh")
  elif jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    saved.write_text(config.to_json_best_effort(indent=2))
  return STAGES[config.stage](config, workdir)


# Fields that do not change what a stage computes: a rerun may change them.
NEUTRAL_FIELDS = ("cache_dir", "data.workers", "data.loader_threads", "train.log_every",
                  "train.progress_bar", "train.keep_checkpoints", "train.distributed",
                  "pretrain2d.prefetch", "pretrain2d.loader_workers")


def holds_results(workdir) -> bool:
  """Whether ``workdir`` holds a stage's work (more than a config.json)."""
  path = epath.Path(workdir)
  return (path / "config.json").exists() and any(
      p.name not in ("config.json", "skips.json") and not p.name.startswith("log.")
      for p in path.iterdir())


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def changed_fields(stored: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'field: old -> new' for each field of ``config`` that changes what the stage computes."""
  old = _flatten(stored)
  new = _flatten(json.loads(config.to_json_best_effort()))
  neutral = lambda k: any(k == f or k.startswith(f + ".") for f in NEUTRAL_FIELDS)
  return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
          for k in sorted(set(old) | set(new)) if not neutral(k) and old.get(k) != new.get(k)]
