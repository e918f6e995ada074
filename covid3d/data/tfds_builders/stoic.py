"""`stoic`: the STOIC2021 COVID-19 CT set (MHA volumes + reference.csv)."""
from covid3d.data.tfds_builders import base


class Stoic(base.ScanRecordBuilder):
  """STOIC2021: CT volumes in Hounsfield units with COVID and severity labels.

  Labels: `stoic_covid` (probCOVID) and `stoic_severe` (probSevere:
  intubation or death within a month), 0/1. Split: train (the public training
  set).
  """

  DATASET = "stoic"
  DESCRIPTION = __doc__
  HOMEPAGE = "https://stoic2021.grand-challenge.org/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the public STOIC2021 training set (the homepage links to it). The
  manual dir must hold:
    data/mha/<PatientID>.mha ...
    metadata/reference.csv      (PatientID,probCOVID,probSevere)
  """

