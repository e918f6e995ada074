"""Stage 6: severity (4 classes) with 5-fold CV, then the fold-ensemble prediction.

  python -m covid3d.main --config=configs/severity.py --workdir=R/severity_segmia \
      --config.init_from=R/segmia --config.data.cov19ctdb_dir=/data/cov19ctdb
Ablations: --config.init_from=random | R/pretrain2d (with --config.inflation.mode=full|1g|2g),
--config.loss.balanced=False, --config.augment.rot90.p=0.
"""
from covid3d import config as base


def get_config(arg=None):
  # 100 epochs over the 258 labelled training scans (docs/method.md).
  return base.finetune_config("severity", arg, epochs=100, labelled_scans=258)
