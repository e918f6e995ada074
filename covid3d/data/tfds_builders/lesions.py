"""`lesions`: the COVID-19-20 lung CT lesion segmentation set (NIfTI)."""
from covid3d.data.tfds_builders import base


class Lesions(base.ScanRecordBuilder):
  """COVID-19-20: CT volumes in Hounsfield units with lesion masks.

  Every record has `mask_<s>`; `has_mask` is 1 where a `_seg` file exists (the
  validation scans have none). No class labels (-1). Splits: train,
  validation and test when their folders are present.
  """

  DATASET = "lesions"
  DESCRIPTION = __doc__
  HOMEPAGE = "https://covid-segmentation.grand-challenge.org/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Register for the COVID-19-20 challenge on grand-challenge.org (see the
  homepage) and download the data. Extract it so that the manual dir holds:
    Train/volume-covid19-A-NNNN_ct.nii.gz
    Train/volume-covid19-A-NNNN_seg.nii.gz ...
    Validation/volume-covid19-A-NNNN_ct.nii.gz ...     (optional)
  (lower-case folder names work too; files directly in the manual dir are the
  train split).
  """

