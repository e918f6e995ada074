"""Run by hand, not chained: the fold ensemble of a finished stage-6 workdir, in a new workdir.

  python -m covid3d.main --config=configs/predict.py --workdir=R/predict \
      --config.init_from=R/severity_segmia

The target (severity or detection) is the one the init_from workdir was fine-tuned for.
"""
from covid3d import config as base


def get_config(arg=None):
  c = base.get_config("predict")
  c.predict = base.predict_config()
  return base.finalize(c, arg)
