"""Stage 4 (segmia): segmentation on COV19-CT-DB pseudo-labels, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/segmia.py --workdir=R/segmia \
      --config.init_from=R/pretrain2d --config.pseudo_labels=R/pseudolabel
"""
from covid3d import config as base


def get_config(arg=None):
  return base.pretraining_config("segmia", arg, num_steps=20000, eval_every=1000)
