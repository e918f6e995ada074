"""Stage ``segmia``: segmentation on COV19-CT-DB with the pseudolabel stage's masks.

Initialised from the inflated ImageNet (pretrain2d) weights, not from the
teacher, as in the paper. ``segmia.partitions`` chooses the partitions whose
scans it trains on (all three by default, as the authors; ``train,`` alone
keeps the reported validation and test scans out).
"""
from covid3d.data.skips import SkipLog
from covid3d.stages import inputs
from covid3d.stages.segmentation import train_segmentation


def run(config, workdir):
  source = inputs.record_source(config, workdir, "cov19ctdb", tuple(config.segmia.partitions),
                                skips=SkipLog())
  source = inputs.with_pseudo_labels(source, config.pseudo_labels, "cov19ctdb")
  return train_segmentation(config, workdir, source)
