"""Stage ``segmia``: segmentation on COV19-CT-DB with the pseudolabel stage's masks.

Initialised from the inflated ImageNet (pretrain2d) weights, not from the
teacher, as in the paper. ``segmia.partitions`` chooses the partitions whose
scans it trains on (all three by default; which the authors used is not known,
docs/method.md; ``train,`` alone keeps the reported validation and test scans
out). ``segmia.validate_on``: 'lesions' (default, the authors') validates the
student on the real lesion masks of the segmentation stage's validation scans,
and trains on every pseudo-labelled scan; 'pseudo_labels' holds out a share of
those instead. What it hands on: ``segmentation.hand_on`` (by default the
student fine-tuned on the lesion set, as the authors').
"""
from covid3d.data.skips import SkipLog
from covid3d.inference import build
from covid3d.stages import inputs
from covid3d.stages.segmentation import hand_on, train_segmentation


def run(config, workdir):
  if config.segmia.validate_on not in ("lesions", "pseudo_labels"):
    raise ValueError(f"segmia.validate_on must be 'lesions' or 'pseudo_labels', "
                     f"got {config.segmia.validate_on!r}")
  skips = SkipLog()
  source = inputs.record_source(config, workdir, "cov19ctdb", tuple(config.segmia.partitions),
                                skips=skips)
  source = inputs.with_pseudo_labels(source, config.pseudo_labels, "cov19ctdb")
  model = build.make_model(config, {}, segmentation=True)

  def train_student(student_dir):
    if config.segmia.validate_on == "lesions":
      return train_segmentation(config, student_dir, source,
                                inputs.record_source(config, workdir, "lesions", skips=skips),
                                model=model)
    return train_segmentation(config, student_dir, source, model=model,
                              fraction=config.data.val_fraction)

  return hand_on(config, workdir, train_student, model, skips)
