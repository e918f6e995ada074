"""Stage 5 (multitask): STOIC severity + segmentation pseudo-labels, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/multitask.py --workdir=R/multitask \
      --config.init_from=R/pretrain2d --config.pseudo_labels=R/pseudolabel
"""
from covid3d import config as base


def get_config(arg=None):
  # STOIC has ~2000 scans: about 40 epochs at batch 4.
  c = base.pretraining_config("multitask", arg, num_steps=20000, eval_every=1000)
  c.train.best_metric = "auc"         # STOIC ROC AUC of P(severe), as the authors select
  c.data.val_fraction = 0.3           # the authors' 70/30 split of STOIC
  return c
