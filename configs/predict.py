"""Stage 7 alone: the fold ensemble of a finished finetune workdir, written to a new workdir.

  python -m covid3d.main --config=configs/predict.py --workdir=R/predict \
      --config.init_from=R/severity_segmia --config.finetune.task=severity
"""
from covid3d import config as base


def get_config(arg=None):
  c = base.get_config("predict")
  c.finetune = base.ml_collections.ConfigDict({"task": "severity"})
  c.predict = base.ml_collections.ConfigDict()
  c.predict.folds = ()
  c.predict.partitions = ("validation", "test")
  return base.finalize(c, arg)
