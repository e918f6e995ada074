"""Stage 3: the segmentation teacher labels COV19-CT-DB and STOIC (masks + NIfTI).

  python -m covid3d.main --config=configs/pseudolabel.py --workdir=R/pseudolabel \
      --config.init_from=R/segmentation --config.data.cov19ctdb_dir=... --config.data.stoic_dir=...
"""
from covid3d import config as base


def get_config(arg=None):
  c = base.get_config("pseudolabel")
  c.pseudolabel = base.ml_collections.ConfigDict()
  c.pseudolabel.mode = "upsample"     # upsample (authors) or sliding (windows on the large cache)
  c.pseudolabel.overlap = 0.5         # sliding-window overlap, fraction of the window
  c.pseudolabel.upsample = "probabilities"  # how `upsample` mode brings the prediction to the
                                      # large cache: 'probabilities' (trilinear, corners
                                      # aligned) or 'logits' (the authors' F.interpolate of the
                                      # logits, half-pixel centres, i.e. align_corners=False);
                                      # thresholded at 0.5
  c.pseudolabel.augment_inputs = True  # the authors' code: the teacher predicts each scan
                                      # through the training augmentation below (drawn from the
                                      # scan's key), and the mask is stored as the label of the
                                      # unaugmented scan, misaligned wherever the draw moved it
                                      # (docs/method.md); False: the clean scan (upsample mode)
  c.augment.elastic.p = 0.0           # their pretraining augmentation: no elastic deformation,
  c.augment.rot90.p = 0.0             # no quarter turns
  c.pseudolabel.write_nifti = True    # masks in each scan's original geometry
  c.pseudolabel.datasets = ("cov19ctdb", "stoic")  # the datasets labelled
  return base.finalize(c, arg)
