"""Stage 3: lesion segmentation on COVID-19-20, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/segmentation.py --workdir=R/segmentation \
      --config.init_from=R/pretrain2d --config.data.lesions_dir=/data/covid19-20
"""
from covid3d import config as base


def get_config(arg=None):
  c = base.get_config("segmentation")
  base.pretraining_optimizer(c)
  c.train.num_steps = 120 * 50        # ~120 epochs of 199 scans at batch 4
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  return base.finalize(c, arg)
