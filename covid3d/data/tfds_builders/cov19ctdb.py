"""`cov19ctdb`: COV19-CT-DB (ECCV 2022 MIA-COV19D), JPEG slice folders."""
from covid3d.data.tfds_builders import base


class Cov19ctdb(base.ScanRecordBuilder):
  """COV19-CT-DB: chest CT scans as folders of JPEG slices.

  Labels: `covid` (0 non-covid, 1 covid) from the class folders, `severity`
  (0 mild .. 3 critical) from the category CSVs for the covid scans that have
  one, -1 elsewhere (and everywhere in `test`). Splits: train, validation, test
  (when its folder is present).
  """

  DATASET = "cov19ctdb"
  DESCRIPTION = __doc__
  HOMEPAGE = "https://mlearn.lincoln.ac.uk/eccv-2022-ai-mia/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  COV19-CT-DB is given out by the organisers of the AI-MIA / MIA-COV19D
  challenges after registration (see the homepage). Extract it so that the
  manual dir holds:
    train/covid/ct_scan_N/0.jpg 1.jpg ...      train/non-covid/ct_scan_N/...
    validation/covid/...  validation/non-covid/...   (or val/, valid/)
    test/ct_scan_N/...                         (optional, unlabelled)
    train_partition_covid_categories.csv       (severity: Name;Category 1..4)
    val_partition_covid_categories.csv
  (the CSVs may also sit inside their partition folder).
  """

