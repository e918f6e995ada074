"""The schema of a preprocessed scan *record*: its fields, TFDS features and numpy view.

A record (made by `covid3d.data.preprocess.preprocess_scan`) is a dict:

  scan_id        str
  volume_<s>     float16 (s, s, s), intensities in [0, 1], one per cached size s
  mask_<s>       uint8 (s, s, s) lesion mask (all zeros when has_mask is 0)
  has_mask       int32 0/1
  covid          int32 0/1 (COV19-CT-DB detection), -1 unknown
  severity       int32 0..3 (mild, moderate, severe, critical), -1 unknown
  stoic_covid    int32 0/1 (STOIC probCOVID), -1 unknown
  stoic_severe   int32 0/1 (STOIC probSevere), -1 unknown

The *index entry* of a record is everything but the arrays; datasets keep one
per record so that folds and label filters are chosen without reading volumes.
"""
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

LABELS = ("covid", "severity", "stoic_covid", "stoic_severe")
INT_FIELDS = ("has_mask",) + LABELS


def volume_key(size: int) -> str:
  return f"volume_{size}"


def mask_key(size: int) -> str:
  return f"mask_{size}"


def field_names(sizes: Iterable[int]) -> tuple[str, ...]:
  """All record fields for the cached cube sizes `sizes`."""
  arrays = [k for s in sizes for k in (volume_key(s), mask_key(s))]
  return ("scan_id", *arrays, *INT_FIELDS)


def tfds_features(sizes: Sequence[int]):
  """`tfds.features.FeaturesDict` of a record (no TensorFlow needed).

  Volumes are stored as raw float16 bytes (fast to decode), masks zlib
  compressed (they are mostly zeros).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = {"scan_id": tfds.features.Text()}
  for s in sizes:
    spec[volume_key(s)] = tfds.features.Tensor(
        shape=(s, s, s), dtype=np.float16, encoding="bytes")
    spec[mask_key(s)] = tfds.features.Tensor(
        shape=(s, s, s), dtype=np.uint8, encoding="zlib")
  for k in INT_FIELDS:
    spec[k] = tfds.features.Scalar(dtype=np.int32)
  return tfds.features.FeaturesDict(spec)


def select_fields(record: Mapping, sizes: Sequence[int]) -> dict:
  """The record's fields for `sizes`, checked to be present; ints as int32.

  Raises:
    KeyError: naming the scan and the missing fields.
  """
  names = field_names(sizes)
  missing = [k for k in names if k not in record]
  if missing:
    raise KeyError(f'record of scan {record.get("scan_id")!r} lacks fields '
                   f'{missing} (has {sorted(record)})')
  return {k: np.int32(record[k]) if k in INT_FIELDS else record[k]
          for k in names}


def scan_id(record: Mapping) -> str:
  sid = record["scan_id"]
  return sid.decode("utf-8") if isinstance(sid, bytes) else str(sid)


def index_entry(record: Mapping) -> dict:
  """Scan id and integer fields of a record (JSON-serialisable)."""
  return {"scan_id": scan_id(record),
          **{k: int(record[k]) for k in INT_FIELDS}}


def to_numpy(record: Mapping, fields: Sequence[str],
             volume_dtype=np.float32) -> dict[str, np.ndarray]:
  """Numpy arrays of `fields` of one record, as the model side wants them.

  Volumes become `volume_dtype` (s, s, s, 1) (None: as cached, float16, for
  the device to convert) and masks uint8 (s, s, s, 1), channels last; labels
  and `has_mask` int32 scalars.

  Raises:
    ValueError: for a field that is not an array or integer field.
  """
  out = {}
  for k in fields:
    if k.startswith("volume_"):
      out[k] = np.asarray(record[k], volume_dtype)[..., None]
    elif k.startswith("mask_"):
      out[k] = np.asarray(record[k], np.uint8)[..., None]
    elif k in INT_FIELDS:
      out[k] = np.asarray(record[k], np.int32)
    else:
      raise ValueError(f'field {k!r} cannot be batched; choose from volume_<s>'
                       f', mask_<s>, {", ".join(INT_FIELDS)}')
  return out
