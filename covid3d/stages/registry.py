"""``run``: runs a stage config with the module the chain names (``chain.Stage.runner``).

``run`` refuses a workdir that holds a run with other settings
(``covid3d.train.config.check_same_settings``);
``python -m covid3d.main --overwrite`` deletes such a run first.
"""
import importlib
import json

import jax
import ml_collections
from etils import epath

from covid3d import config as base_config
from covid3d import storage
from covid3d.models import dwconv
from covid3d.train import config as train_config
from covid3d.stages import chain, handoff

# config.stage: a config the chain runs (severity and detection are one stage, two targets).
CONFIGS = tuple(c for s in chain.STAGES if s.runner for c in s.configs)


def run(config: ml_collections.ConfigDict, workdir: str):
  """Runs the stage ``config.stage`` in ``workdir``, after saving the config there.

  A workdir that already holds work keeps its ``config.json``, and the stage
  resumes it (skipping what is done) when the settings agree; otherwise
  ``covid3d.train.config.SettingsChanged`` names the changed fields.

  ``stage:NAME`` sources are first resolved to the workdir ``NAME`` beside ``workdir``.
  """
  if config.stage not in CONFIGS:
    raise handoff.HandOffError(f"config.stage={config.stage!r} is not one of {sorted(CONFIGS)}")
  stage = chain.stage_of(config.stage)
  config = base_config.split_string_tuples(handoff.resolve_siblings(config, workdir))
  if config.stage != "predict":   # predict's init_from is a fine-tuning workdir (its folds)
    handoff.check_source(config.init_from)
    handoff.check_inflation(config)
  if stage.per_target:
    handoff.check_folds_csv(config)
  if stage.pseudo_labels:
    handoff.check_pseudo_labels(config.pseudo_labels, config.stage)
  saved = epath.Path(workdir) / "config.json"
  if holds_results(workdir):
    train_config.check_same_settings(json.loads(saved.read_text()), config, workdir)
  elif jax.process_index() == 0:
    storage.write_text(saved, config.to_json_best_effort(indent=2))
  try:
    return importlib.import_module(stage.runner).run(config, workdir)
  finally:
    record_dwconv_choices(saved)


def record_dwconv_choices(saved: epath.Path):
  """Adds what ``dwconv_impl='auto'`` chooses to ``config.json`` as ``dwconv_auto``.

  ``{'<platform>|<device kind>|<input shape>|<kernel shape>|<dtype>|<candidates>':
  backend}``: process 0's table for its device (``covid3d.models.dwconv_tune``),
  whose choices every process used; it holds every shape the stage ran (and
  those of other runs that share the cache root). Written by process 0, merged
  with what an earlier part of the run recorded.
  """
  chosen = dwconv.recorded_choices() if jax.process_index() == 0 else {}
  if not chosen:
    return
  stored = storage.read_json(saved)
  if stored.get("model", {}).get("dwconv_impl") == "auto":
    stored["dwconv_auto"] = {**stored.get("dwconv_auto", {}), **chosen}
    storage.write_json(saved, stored, indent=2)


def holds_results(workdir) -> bool:
  """Whether ``workdir`` holds a stage's work (more than a config.json)."""
  path = epath.Path(workdir)
  return (path / "config.json").exists() and any(
      p.name not in ("config.json", "skips.json") and not p.name.startswith("log.")
      for p in path.iterdir())
