"""Stage 5a (segmia): segmentation on COV19-CT-DB pseudo-labels, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/segmia.py --workdir=R/segmia \
      --config.init_from=R/pretrain2d --config.pseudo_labels=R/pseudolabel
"""
from covid3d import config as base


def get_config(arg=None):
  c = base.get_config("segmia")
  base.pretraining_optimizer(c)
  c.train.num_steps = 20000
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  return base.finalize(c, arg)
