"""The schema of a preprocessed scan *record*: its fields and numpy view.

A record (made by `covid3d.data.preprocess.preprocess_scan`) is a dict:

  scan_id        str
  volume_<s>     float16 (s, s, s), intensities in [0, 1], one per cached size s;
                 or uint8 round(255 v) (`data.record_dtype`)
  mask_<s>       uint8 (s, s, s) lesion mask (all zeros when has_mask is 0)
  has_mask       int32 0/1
  covid          int32 0/1 (COV19-CT-DB detection), -1 unknown
  severity       int32 0..3 (mild, moderate, severe, critical), -1 unknown
  stoic_covid    int32 0/1 (STOIC probCOVID), -1 unknown
  stoic_severe   int32 0/1 (STOIC probSevere), -1 unknown

The *index entry* of a record is everything but the arrays; datasets keep one
per record so that folds and label filters are chosen without reading volumes.
"""
from collections.abc import Mapping, Sequence

import numpy as np

LABELS = ("covid", "severity", "stoic_covid", "stoic_severe")
INT_FIELDS = ("has_mask",) + LABELS


def volume_key(size: int) -> str:
  return f"volume_{size}"


def mask_key(size: int) -> str:
  return f"mask_{size}"


def decode_volume(volume, dtype=np.float32) -> np.ndarray:
  """A stored volume as `dtype` in [0, 1]: uint8 v -> v / 255 (computed in float32)."""
  volume = np.asarray(volume)
  if volume.dtype == np.uint8:
    return (volume.astype(np.float32) / np.float32(255)).astype(dtype, copy=False)
  return volume.astype(dtype, copy=False)


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

  Volumes become `volume_dtype` (s, s, s, 1) in [0, 1] (`decode_volume`;
  None: as cached, float16 or uint8, for the device to convert) and masks
  uint8 (s, s, s, 1), channels last; labels and `has_mask` int32 scalars.

  Raises:
    ValueError: for a field that is not an array or integer field.
  """
  out = {}
  for k in fields:
    if k.startswith("volume_"):
      volume = record[k]
      out[k] = (np.asarray(volume) if volume_dtype is None
                else decode_volume(volume, volume_dtype))[..., None]
    elif k.startswith("mask_"):
      out[k] = np.asarray(record[k], np.uint8)[..., None]
    elif k in INT_FIELDS:
      out[k] = np.asarray(record[k], np.int32)
    else:
      raise ValueError(f'field {k!r} cannot be batched; choose from volume_<s>'
                       f', mask_<s>, {", ".join(INT_FIELDS)}')
  return out
