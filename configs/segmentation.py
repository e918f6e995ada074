"""Stage 2: lesion segmentation on COVID-19-20, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/segmentation.py --workdir=R/segmentation \
      --config.init_from=R/pretrain2d --config.data.lesions_dir=/data/covid19-20
"""
from covid3d import config as base


def get_config(arg=None):
  # About 120 epochs of the 199 training scans at batch 4.
  return base.pretraining_config("segmentation", arg, num_steps=6000, eval_every=250)
