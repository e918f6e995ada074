"""Stage 6 (detection): COVID vs non-COVID (2 classes) with 5-fold CV and the fold ensemble.

  python -m covid3d.main --config=configs/detection.py --workdir=R/detection_multitask \
      --config.init_from=R/multitask --config.data.cov19ctdb_dir=/data/cov19ctdb
"""
from covid3d import config as base


def get_config(arg=None):
  # 70 epochs over the 1992 training scans of the 2nd challenge (docs/method.md).
  return base.finetune_config("detection", arg, epochs=70, labelled_scans=1992)
