"""DICOM: a folder's series, or one file, as a volume whose geometry comes from its headers.

Every file's header is read first (pydicom, pixel data skipped); nothing is decoded
before the series is known to make one volume of an allowed size:

* the files are grouped by SeriesInstanceUID and the group with the most frames is read
  (the choice is logged); files that are not DICOM are ignored, and so is anything in the
  folder that is not a regular file (a pipe is never opened);
* a frame is a classic file's image, or one frame of an enhanced multi-frame file
  (Enhanced CT: positions and orientations in the functional groups), so an enhanced
  file reads as a volume whether named directly or found in a folder;
* every frame must have a position (ImagePositionPatient) and one orientation
  (ImageOrientationPatient) shared by all, one size and one sample per pixel; else the
  series is refused with the reason (a `ValueError`), never given 1 mm slices;
* frames are ordered by their position along the slice normal; two at one position are
  refused; spacing that varies by more than ``UNIFORM_TOLERANCE`` is resampled by position
  (linear, onto the median spacing; ``info['resampled']`` says so), and a gap of more than
  ``MAX_GAP`` times the median spacing (missing slices) is refused;
* the frames' voxel count is checked against ``max_voxels`` before any is allocated.

SimpleITK (GDCM) decodes the pixel data of each file and applies the rescale slope and
intercept (Hounsfield units for CT).
"""
import contextlib
import locale
import logging
from pathlib import Path

import numpy as np

from covid3d.data import headers
from covid3d.data import scan as scan_lib

log = logging.getLogger(__name__)

UNIFORM_TOLERANCE = 0.05   # slice spacing may vary by 5 % of the median and count as uniform
MAX_GAP = 3.0              # a gap > 3 median spacings: slices missing, refused
SAME_POSITION_MM = 0.01    # two frames closer than this along the normal are one position
ORIENTATION_TOLERANCE = 1e-3


def _floats(value, n):
  try:
    out = [float(v) for v in value]
  except (TypeError, ValueError):
    return None
  return out if len(out) == n else None


def _functional(ds, frame_groups, keyword, attribute):
  """``attribute`` of the ``keyword`` functional group (per-frame first, then shared)."""
  for groups in (frame_groups, *ds.get("SharedFunctionalGroupsSequence", [])):
    items = groups.get(keyword) if groups is not None else None
    if items:
      value = items[0].get(attribute)
      if value is not None:
        return value
  return None


def frames_of(path, ds) -> list[dict]:
  """The frames of one DICOM header ``ds`` (of ``path``): file, index, position, orientation,
  pixel spacing (None where a header lacks it), rows, columns and samples per pixel."""
  n = int(ds.get("NumberOfFrames", 1) or 1)
  per_frame = ds.get("PerFrameFunctionalGroupsSequence")
  common = {"file": str(path), "rows": int(ds.get("Rows", 0)),
            "columns": int(ds.get("Columns", 0)),
            "samples": int(ds.get("SamplesPerPixel", 1)),
            "series": str(ds.get("SeriesInstanceUID", "")),
            "modality": str(ds.get("Modality", ""))}
  frames = []
  for k in range(n):
    groups = per_frame[k] if per_frame is not None and k < len(per_frame) else None
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    spacing = ds.get("PixelSpacing")
    if per_frame is not None or "SharedFunctionalGroupsSequence" in ds:
      position = _functional(ds, groups, "PlanePositionSequence", "ImagePositionPatient")
      orientation = _functional(ds, groups, "PlaneOrientationSequence",
                                "ImageOrientationPatient")
      spacing = _functional(ds, groups, "PixelMeasuresSequence", "PixelSpacing")
    elif n > 1:   # a classic multi-frame file (no functional groups): one position for all
      position = None if k else position
    frames.append({**common, "index": k, "position": _floats(position, 3),
                   "orientation": _floats(orientation, 6), "pixel_spacing": _floats(spacing, 2)})
  return frames


def read_headers(paths) -> list[dict]:
  """The frames (`frames_of`) of every DICOM file among ``paths``; other files are skipped."""
  import pydicom  # pylint: disable=import-outside-toplevel
  frames = []
  for p in paths:
    try:
      ds = pydicom.dcmread(str(p), stop_before_pixels=True)
    except Exception:  # pylint: disable=broad-except  # not DICOM, or unreadable: not a frame
      log.debug("%s: not a DICOM file; ignored", p)
      continue
    if "Rows" in ds and "Columns" in ds:   # an image (not a report, a DICOMDIR)
      frames.extend(frames_of(p, ds))
  return frames


def choose_series(frames, where) -> list[dict]:
  """The frames of the series with the most frames (ties: the larger UID); logged if several.

  Raises:
    Refused: no DICOM image at all.
  """
  if not frames:
    raise headers.Refused("no DICOM series (and no .jpg/.png slices) in the folder")
  by_series = {}
  for f in frames:
    by_series.setdefault(f["series"], []).append(f)
  uid = max(by_series, key=lambda u: (len(by_series[u]), u))
  if len(by_series) > 1:
    log.warning("%s: %d DICOM series; reading the largest, %s (%d slices)", where,
                len(by_series), uid, len(by_series[uid]))
  return by_series[uid]


def geometry(frames):
  """(frames ordered along the normal, their positions along it (mm), direction (3, 3) LPS
  columns (row, column, normal), pixel spacing (column step x, row step y) mm).

  Raises:
    ValueError: positions or orientations missing, orientations mixed, sizes mixed, several
      samples per pixel, or two frames at one position.
  """
  n = len(frames)
  sizes = {(f["rows"], f["columns"]) for f in frames}
  if len(sizes) > 1:
    raise ValueError(f"slices of {len(sizes)} sizes ({', '.join(f'{r}x{c}' for r, c in sizes)}) "
                     "in one series: not one volume")
  if frames[0]["samples"] != 1:
    raise ValueError(f"colour images ({frames[0]['samples']} samples per pixel): not a CT")
  missing = sum(f["position"] is None for f in frames)
  if missing:
    raise ValueError(f"{missing} of {n} slices have no position (ImagePositionPatient): "
                     "their spacing is unknown")
  if any(f["orientation"] is None for f in frames):
    raise ValueError("slices without an orientation (ImageOrientationPatient)")
  orientations = np.array([f["orientation"] for f in frames])
  kinds = np.unique(np.round(orientations / ORIENTATION_TOLERANCE).astype(np.int64), axis=0)
  if len(kinds) > 1 and np.ptp(orientations, axis=0).max() > ORIENTATION_TOLERANCE:
    raise ValueError(f"slices in {len(kinds)} orientations (ImageOrientationPatient): "
                     "not one volume")
  row, col = orientations[0, :3], orientations[0, 3:]
  normal = np.cross(row, col)
  where = np.array([f["position"] for f in frames]) @ normal
  order = np.argsort(where, kind="stable")
  where = where[order]
  steps = np.diff(where)
  if n > 1 and steps.min() < SAME_POSITION_MM:
    raise ValueError(f"two slices at one position ({where[int(steps.argmin())]:.2f} mm along "
                     "the slice normal): several acquisitions in one series")
  spacing = frames[0]["pixel_spacing"] or [1.0, 1.0]   # PixelSpacing: row step, column step
  direction = np.stack([row, col, normal], axis=1)
  return [frames[i] for i in order], where, direction, (spacing[1], spacing[0])


def uniform_positions(where) -> tuple[np.ndarray | None, float]:
  """(None, spacing) when the positions ``where`` (mm, ascending) are uniform within
  ``UNIFORM_TOLERANCE``, else (the uniform grid to resample onto, its spacing).

  Raises:
    ValueError: a gap of more than ``MAX_GAP`` median spacings.
  """
  if len(where) < 2:
    return None, 1.0
  steps = np.diff(where)
  median = float(np.median(steps))
  if steps.max() > MAX_GAP * median:
    k = int(steps.argmax())
    raise ValueError(f"a gap of {steps[k]:.1f} mm between slices {k} and {k + 1} where they are "
                     f"{median:.2f} mm apart: slices are missing")
  if np.abs(steps - median).max() <= UNIFORM_TOLERANCE * median:
    return None, median
  n = int(round((where[-1] - where[0]) / median)) + 1
  return where[0] + median * np.arange(n), median


def resample_slices(data, where, grid) -> np.ndarray:
  """(K', J, I) float32: ``data`` (K, J, I) at slice positions ``where`` (mm), linearly
  interpolated at the positions ``grid``."""
  k = np.clip(np.searchsorted(where, grid, side="right") - 1, 0, len(where) - 2)
  t = ((grid - where[k]) / (where[k + 1] - where[k])).astype(np.float32)[:, None, None]
  return (data[k] * (1 - t) + data[k + 1] * t).astype(np.float32)


@contextlib.contextmanager
def kept_locale():
  """Restores the process locale afterwards: GDCM (SimpleITK's DICOM IO) sets it to "C",
  which would make Python decode text as ASCII from then on."""
  saved = locale.setlocale(locale.LC_ALL)
  try:
    yield
  finally:
    locale.setlocale(locale.LC_ALL, saved)


def read_pixels(frames) -> np.ndarray:
  """float32 (K, J, I): the ``frames`` decoded (SimpleITK/GDCM, rescale applied), in order."""
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  rows, cols = frames[0]["rows"], frames[0]["columns"]
  out = np.empty((len(frames), rows, cols), np.float32)
  decoded = {}
  for k, f in enumerate(frames):
    if f["file"] not in decoded:
      reader = sitk.ImageFileReader()
      reader.SetImageIO("GDCMImageIO")
      reader.SetFileName(f["file"])
      with kept_locale():
        image = reader.Execute()
      decoded = {f["file"]: sitk.GetArrayViewFromImage(image).reshape(-1, rows, cols)}
    out[k] = decoded[f["file"]][f["index"]]
  return out


def read_dicom(path, files, max_voxels: int):
  """A DICOM series folder, or one DICOM file, as a volume (module doc).

  Args:
    path: the folder or file given (named in errors).
    files: the regular files of that folder (``[path]`` for a file).

  Returns:
    (float32 array (I, J, K) in voxel order, (4, 4) RAS affine, info: ``modality``, and
    ``resampled`` (text) when the slices were resampled by position).

  Raises:
    Refused: the reason the files make no volume, or too many voxels.
    Exception: a decoder's error for bad pixel data.
  """
  path = Path(path)
  frames = choose_series(read_headers(files), path)
  headers.check_voxels(len(frames) * frames[0]["rows"] * frames[0]["columns"], max_voxels,
                           f"{len(frames)} slices of {frames[0]['rows']}x{frames[0]['columns']}")
  modality = frames[0]["modality"]
  try:
    frames, where, direction, (sx, sy) = geometry(frames)
    grid, sz = uniform_positions(where)
  except ValueError as e:
    raise headers.Refused(f"{modality} series: {e}" if modality != "CT" else str(e)) from None
  data = read_pixels(frames)
  info = {"modality": modality}
  if grid is not None:
    steps = np.diff(where)
    data = resample_slices(data, where, grid)
    info["resampled"] = (f"slice spacing {steps.min():.2f} to {steps.max():.2f} mm, resampled by "
                         f"position to {sz:.2f} mm")
    log.warning("%s: %s", path, info["resampled"])
  affine = scan_lib.itk_to_ras_affine((sx, sy, sz), frames[0]["position"], direction)
  return data.T, affine, info
