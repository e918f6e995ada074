"""Stage 5b (multitask): STOIC severity + segmentation pseudo-labels, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/multitask.py --workdir=R/multitask \
      --config.init_from=R/pretrain2d --config.pseudo_labels=R/pseudolabel
"""
from covid3d import config as base


def get_config(arg=None):
  c = base.get_config("multitask")
  base.pretraining_optimizer(c)
  c.train.num_steps = 20000
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  return base.finalize(c, arg)
