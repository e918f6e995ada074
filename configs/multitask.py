"""Stage 5 (multitask): STOIC severity + segmentation pseudo-labels, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/multitask.py --workdir=R/multitask \
      --config.init_from=R/pretrain2d --config.pseudo_labels=R/pseudolabel
"""
from covid3d import config as base


def get_config(arg=None):
  # STOIC has ~2000 scans: about 40 epochs at batch 4.
  c = base.pretraining_config("multitask", arg, num_steps=20000, eval_every=1000,
                              lesion_finetune=True)
  c.train.best_metric = "auc"         # STOIC ROC AUC of P(severe), as the authors select
  c.data.val_fraction = 0.3           # the authors' 70/30 split of STOIC
  c.train.shuffle = False             # the authors' STOIC loader reads the scans in one fixed
                                      # order (their split's) every epoch; True draws each
                                      # epoch's order
  c.multitask = base.ml_collections.ConfigDict()
  c.multitask.scans = "positive"      # the STOIC scans split and batched: 'positive', the
                                      # COVID-positive ones (theirs: every batch counts 4 scans
                                      # in both losses); 'all', every scan, the negative ones
                                      # masked out of the losses and metrics (a batch with no
                                      # positive scan still moves Adam's moments and the EMA)
  return c
