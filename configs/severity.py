"""Stage 6: severity (4 classes) with 5-fold CV, then the fold-ensemble prediction.

  python -m covid3d.main --config=configs/severity.py --workdir=R/severity_segmia \
      --config.init_from=R/segmia --config.data.cov19ctdb_dir=/data/cov19ctdb
Ablations: --config.init_from=random | R/pretrain2d (with --config.inflation.mode=full|1g|2g),
--config.loss.balanced=False, --config.augment.rot90.p=0.

Presets (``configs/severity.py:NAME``; data in covid3d/stages/chain.py, tabled in
docs/method.md), each starting from the stage workdir beside its own (R/<stage>
for the workdir R/x):
  authors1..authors5  the authors' five challenge submissions (predict with fold 5)
  table1_ce           the paper's Table 1 plain-CE row (ImageNet, full inflation)
  table2_1g, table2_2g  Table 2: ImageNet with 1G (their per-slice rescale) / 2G inflation
  table3_random       Table 3: random initialisation
(the other rows of Tables 1-3 are authors1..authors4 with the 5-fold ensemble:
an empty ``--config.predict.folds=``). The ImageNet presets inflate into the
(slice, row) plane as their code (new_axis=2). Their fold file:
--config.data.folds_csv=cv5_infonly.csv (their training/splitmia/).
"""
from covid3d import config as base


def get_config(arg=None):
  # 100 epochs over the 258 labelled training scans (docs/method.md).
  return base.finetune_config("severity", arg, epochs=100)
