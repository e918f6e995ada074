"""Stage 4 (segmia): segmentation on COV19-CT-DB pseudo-labels, from the inflated 2-D weights.

  python -m covid3d.main --config=configs/segmia.py --workdir=R/segmia \
      --config.init_from=R/pretrain2d --config.pseudo_labels=R/pseudolabel
"""
from covid3d import config as base


def get_config(arg=None):
  c = base.pretraining_config("segmia", arg, num_steps=20000, eval_every=1000,
                              lesion_finetune=True)
  c.train.shuffle = False             # the authors' pseudo-label loader reads the scans in one
                                      # fixed order every epoch; True draws each epoch's order
  c.segmia = base.ml_collections.ConfigDict()
  c.segmia.partitions = ("train", "validation", "test")  # COV19-CT-DB partitions whose
                                      # pseudo-labelled scans segmia trains on; all three is
                                      # transductive: the validation and test scans the results
                                      # are reported on are seen, without their labels;
                                      # ("train",) keeps them out. Which the authors used is not
                                      # known; their released cache covers train and validation
                                      # only (docs/method.md)
  c.segmia.validate_on = "lesions"    # what the student is validated on (picks the checkpoint
                                      # handed on): 'lesions', the real masks of the
                                      # segmentation stage's validation scans (the authors'),
                                      # or 'pseudo_labels', a held-out share of its training data
  return c
