"""Tiny writers of test data in the real datasets' formats (JPEG folders, NIfTI, MHA)."""
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image


def write_slices(folder, slices, names=None, quality=95) -> list[Path]:
  """Writes uint8 (D, H, W) `slices` as gray-as-RGB JPEGs `<k>.jpg` (or `names`)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for k, sl in enumerate(slices):
    p = folder / (names[k] if names else f"{k}.jpg")
    Image.fromarray(np.asarray(sl, np.uint8)).convert("RGB").save(p, quality=quality)
    paths.append(p)
  return paths


def ramp_scan(n_slices, size=32, step=10) -> np.ndarray:
  """uint8 (D, size, size); slice k is the constant step * k (exact in JPEG)."""
  return np.repeat((np.arange(n_slices) * step).astype(np.uint8), size * size).reshape(
      n_slices, size, size)


def write_cov19ctdb(root, *, csv_text=None, csv_name="train_partition_covid_categories.csv"):
  """A small COV19-CT-DB tree; returns {scan_id: uint8 volume} of train.

  train: covid/ct_scan_0 (12 slices), covid/ct_scan_1 (8), covid/ct_scan_2 (9,
  not in the CSV), non-covid/ct_scan_0 (10); validation: covid/ct_scan_5 (8);
  test: ct_scan_7 (8). The severity CSV (default `Name;Category`: ct_scan_0
  -> 3, ct_scan_1 -> 1) is written at the root.
  """
  root = Path(root)
  scans = {"covid/ct_scan_0": ramp_scan(12), "covid/ct_scan_1": ramp_scan(8, step=20),
           "covid/ct_scan_2": ramp_scan(9, step=5), "non-covid/ct_scan_0": ramp_scan(10, step=7)}
  for scan_id, vol in scans.items():
    write_slices(root / "train" / scan_id, vol)
  write_slices(root / "validation" / "covid" / "ct_scan_5", ramp_scan(8))
  write_slices(root / "test" / "ct_scan_7", ramp_scan(8))
  if csv_text is None:
    csv_text = "Name;Category\nct_scan_0;3\nct_scan_1;1\n"
  (root / csv_name).write_text(csv_text)
  return scans


def hu_volume(shape=(12, 20, 24), seed=0) -> np.ndarray:
  """float32 (D, H, W) HU volume, integer values in [-1200, 700] (clip exercised)."""
  return np.random.default_rng(seed).integers(-1200, 700, shape).astype(np.float32)


def lps_affine(spacing_zyx, origin_xyz=(10., -20., 30.)) -> np.ndarray:
  """RAS affine of the canonical grid: voxel (x, y, z) -> L, P, S at `spacing`."""
  sz, sy, sx = spacing_zyx
  aff = np.diag([-sx, -sy, sz, 1.0])
  aff[:3, 3] = [-origin_xyz[0], -origin_xyz[1], origin_xyz[2]]
  return aff


def write_nifti(path, data_ijk, affine, dtype=np.int16) -> Path:
  img = nib.Nifti1Image(np.asarray(data_ijk).astype(dtype), affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, str(path))
  return Path(path)


def write_mha(path, data_zyx, spacing_xyz=(0.8, 0.7, 2.5), origin=(1., 2., 3.),
              direction=None, dtype=np.int16) -> Path:
  """An MHA whose numpy (z, y, x) array is `data_zyx` with the given geometry."""
  if direction is None:
    direction = np.eye(3)
  img = sitk.GetImageFromArray(np.asarray(data_zyx).astype(dtype))
  img.SetSpacing(tuple(spacing_xyz))
  img.SetOrigin(tuple(origin))
  img.SetDirection(tuple(np.asarray(direction, float).ravel()))
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  sitk.WriteImage(img, str(path))
  return Path(path)


def write_stoic(root, volumes: dict, labels: dict) -> Path:
  """`data/mha/<id>.mha` for each of `volumes` ({id: HU (D, H, W)}) and
  `metadata/reference.csv` with `labels` ({id: (probCOVID, probSevere)})."""
  root = Path(root)
  for pid, vol in volumes.items():
    write_mha(root / "data" / "mha" / f"{pid}.mha", vol)
  (root / "metadata").mkdir(parents=True, exist_ok=True)
  lines = ["PatientID,probCOVID,probSevere"] + [f"{p},{c},{s}" for p, (c, s) in labels.items()]
  (root / "metadata" / "reference.csv").write_text("\n".join(lines) + "\n")
  return root
