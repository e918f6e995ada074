"""Stage 6 (detection): COVID vs non-COVID (2 classes) with 5-fold CV and the fold ensemble.

  python -m covid3d.main --config=configs/detection.py --workdir=R/detection_multitask \
      --config.init_from=R/multitask --config.data.cov19ctdb_dir=/data/cov19ctdb

Presets (``configs/detection.py:NAME``; data in covid3d/stages/chain.py, tabled in
docs/method.md), each starting from the stage workdir beside its own (R/<stage>
for the workdir R/x):
  authors1..authors5  the authors' five challenge submissions; 1 inflates the ImageNet
                      weights into the (slice, row) plane as their code (new_axis=2);
                      2-5 start from pretrainings run with --config.inflation.mode=2g,
                      in R/<stage>_2g (launch/ablations.sh makes them; a source made
                      with another inflation stops the run); 4 and 5 train without
                      cross-validation (data.folds=1).
Their fold file: --config.data.folds_csv=cv5_cov_nocov.csv (their training/splitmia/).
"""
from covid3d import config as base


def get_config(arg=None):
  # 70 epochs over the 1992 training scans of the 2nd challenge (docs/method.md).
  return base.finetune_config("detection", arg, epochs=70)
