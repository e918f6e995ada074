"""The pipeline stages; ``config.stage`` names the module whose ``run(config, workdir)`` runs.

pretrain2d -> (inflate) -> segmentation -> pseudolabel -> segmia | multitask
-> finetune (k-fold severity or detection) -> predict (fold ensemble).
"""
import importlib

import jax
from etils import epath

STAGES = ("pretrain2d", "segmentation", "pseudolabel", "segmia", "multitask", "finetune", "predict")


def run(config, workdir):
  """Runs the stage ``config.stage`` in ``workdir``, after saving the config there."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not one of {STAGES}")
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  return importlib.import_module(f"covid3d.stages.{config.stage}").run(config, workdir)
