"""Stage 2: lesion segmentation on COVID-19-20, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/segmentation.py --workdir=R/segmentation \
      --config.init_from=R/pretrain2d --config.data.lesions_dir=/data/covid19-20
"""
from covid3d import config as base


def get_config(arg=None):
  # The authors' 119 epochs (1..119 of MAX_EPOCHS 120), evaluated after each: with 169 training
  # scans (85 % of 199) at batch 4 that is 119 x 42 = 4998 steps here (the last, incomplete
  # batch of an epoch dropped); their loader keeps it, 119 x 43 = 5117 iterations of which 119
  # hold one scan. num_steps is unused while num_epochs is set.
  return base.pretraining_config("segmentation", arg, num_steps=5000, eval_every=250,
                                 num_epochs=119)
