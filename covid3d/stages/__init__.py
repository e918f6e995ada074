"""The pipeline stages; ``config.stage`` names the module whose ``run(config, workdir)`` runs.

pretrain2d -> (inflate) -> segmentation -> pseudolabel -> segmia | multitask
-> finetune (k-fold severity or detection) -> predict (fold ensemble).
"""
import importlib

STAGES = ("pretrain2d", "segmentation", "pseudolabel", "segmia", "multitask", "finetune", "predict")


def run(config, workdir):
  """Runs the stage ``config.stage`` in ``workdir``."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not one of {STAGES}")
  return importlib.import_module(f"covid3d.stages.{config.stage}").run(config, workdir)
