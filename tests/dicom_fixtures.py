"""DICOM test data from the files pydicom ships (``pydicom.data``), not written by covid3d.

``CT_small.dcm`` (a 128 x 128 CT image) and ``MR_small.dcm`` (64 x 64 MR) are copied with
pydicom, their positions, slice counts, orientation or pixels edited, into series and into an
Enhanced CT multi-frame file; all are real DICOM files that SimpleITK and pydicom read.
"""
import copy
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

SERIES_UID = "1.2.826.0.1.3680043.2.1125.9.1"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def source(name="CT_small.dcm") -> Dataset:
  """A file of pydicom's test data, read."""
  return pydicom.dcmread(pydicom.data.get_testdata_file(name))


def with_pixels(ds: Dataset, pixels, pixel_mm) -> Dataset:
  """``ds`` holding int16 ``pixels`` (R, C) in HU (rescale 1, 0) at ``pixel_mm`` spacing."""
  pixels = np.asarray(np.round(pixels), np.int16)
  ds.Rows, ds.Columns = pixels.shape
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.RescaleSlope, ds.RescaleIntercept = 1, 0
  ds.PixelSpacing = [pixel_mm, pixel_mm]
  ds.PixelData = pixels.tobytes()
  return ds


def shrunk(name, factor) -> tuple[np.ndarray, float]:
  """(the file's pixels in HU block-averaged by ``factor``, their spacing mm)."""
  ds = source(name)
  px = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
      ds.get("RescaleIntercept", 0))
  r, c = (n // factor for n in px.shape)
  px = px[:r * factor, :c * factor].reshape(r, factor, c, factor).mean(axis=(1, 3))
  return px, float(ds.PixelSpacing[0]) * factor


def write_series(folder, n, *, name="CT_small.dcm", slice_mm=5.0, pixels=None, pixel_mm=None,
                 orientation=(1, 0, 0, 0, 1, 0), positions=None, drop=()) -> list[Path]:
  """``n`` copies of pydicom's ``name`` as one series in ``folder`` (files ``<k>.dcm`` in
  reverse order of position).

  Args:
    pixels: (n, R, C) HU to store instead of the file's own pixels (then ``pixel_mm``).
    orientation: ImageOrientationPatient of every slice (row, column direction cosines).
    positions: each slice's offset along the normal, mm (default k * ``slice_mm``).
    drop: tags deleted from every copy (e.g. ``"ImagePositionPatient"``).
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  base = source(name)
  row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
  normal = np.cross(row, col)
  start = np.asarray(base.ImagePositionPatient, float)
  offsets = np.arange(n) * slice_mm if positions is None else np.asarray(positions, float)
  paths = []
  for k, offset in enumerate(offsets):
    ds = copy.deepcopy(base)
    if pixels is not None:
      with_pixels(ds, pixels[k], pixel_mm)
    ds.SeriesInstanceUID = SERIES_UID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{SERIES_UID}.{k + 1}"
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [float(v) for v in start + offset * normal]
    ds.SliceThickness = slice_mm
    for tag in drop:
      if tag in ds:
        delattr(ds, tag)
    path = folder / f"{n - 1 - k}.dcm"
    ds.save_as(path)
    paths.append(path)
  return paths


def write_enhanced_ct(path, n, *, slice_mm=5.0) -> Path:
  """pydicom's CT_small.dcm as an Enhanced CT file of ``n`` frames (the image repeated),
  positions and orientation in the functional groups, ``slice_mm`` apart."""
  ct = source()
  ds = copy.deepcopy(ct)
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
  ds.NumberOfFrames = n
  ds.PixelData = np.concatenate([ct.pixel_array] * n).tobytes()
  measures, plane = Dataset(), Dataset()
  measures.PixelSpacing, measures.SliceThickness = ct.PixelSpacing, slice_mm
  plane.ImageOrientationPatient = ct.ImageOrientationPatient
  shared = Dataset()
  shared.PixelMeasuresSequence = Sequence([measures])
  shared.PlaneOrientationSequence = Sequence([plane])
  ds.SharedFunctionalGroupsSequence = Sequence([shared])
  frames = []
  for k in range(n):
    position, frame = Dataset(), Dataset()
    position.ImagePositionPatient = [float(v) for v in ct.ImagePositionPatient[:2]] + [
        float(ct.ImagePositionPatient[2]) + slice_mm * k]
    frame.PlanePositionSequence = Sequence([position])
    frames.append(frame)
  ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
  for tag in ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness",
              "PixelSpacing"):
    delattr(ds, tag)
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path)
  return Path(path)
