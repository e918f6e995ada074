"""``covid3d.infer`` accepts only what can be a chest CT (``covid3d.data.acceptance``), on real
DICOM files that pydicom ships (``tests/dicom_fixtures.py``), phantom scans and noise; flags
folds that disagree. The model is test_outputs' tiny exported ensemble (seconds)."""
import csv

import nibabel as nib
import numpy as np
import pytest

from covid3d import export, infer
from covid3d.data import acceptance, phantom, phantom_writers, read_common, readers
from tests import dicom_fixtures
from tests.data_fixtures import write_slices
from tests.infer.test_outputs import write_model

NAMES = ("mild", "moderate", "severe", "critical")


def phantom_series(folder, orientation=(1, 0, 0, 0, 1, 0), seed=0, shape=(40, 64, 64)):
  """A phantom chest CT stored in copies of pydicom's CT_small.dcm (its header, the phantom's
  pixels), in ``orientation``: (1, 0, 0, 0, 1, 0), or (1, 0, 0, 0, -1, 0), whose rows run
  anterior and whose slices are stacked feet-wards."""
  hu, _, info = phantom.make_scan(seed, kind="covid", severity=1, shape=shape)
  if orientation[4] < 0:
    hu = hu[::-1, ::-1, :]
  sz, sy, _ = info["spacing"]
  dicom_fixtures.write_series(folder, len(hu), pixels=hu, pixel_mm=sy, slice_mm=sz,
                              orientation=orientation)
  return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """The inputs of issue 24's table, each a real DICOM file or a NIfTI of noise."""
  t = tmp_path_factory.mktemp("inputs")
  dicom_fixtures.write_series(t / "mr", 40, name="MR_small.dcm")
  for n in (4, 5):
    px, mm = dicom_fixtures.shrunk("CT_small.dcm", 8)   # 16 x 16 pixels
    dicom_fixtures.write_series(t / f"ct{n}", n, pixels=np.repeat(px[None], n, 0), pixel_mm=mm)
  dicom_fixtures.write_enhanced_ct(t / "enhanced.dcm", 2)
  dicom_fixtures.write_enhanced_ct(t / "enhanced_folder" / "1.dcm", 2)
  noise = np.random.default_rng(0).uniform(-1024, 3071, (64, 96, 96)).astype(np.int16)
  nib.save(nib.Nifti1Image(noise, np.diag([3.0, 3.0, 5.0, 1.0])), str(t / "noise.nii.gz"))
  phantom_series(t / "phantom")
  return t


def read_table(path):
  with open(path, newline="") as f:
    return {r["scan"]: r for r in csv.DictReader(f)}


def test_only_what_can_be_a_chest_ct_is_predicted(inputs, tmp_path):
  model = write_model(tmp_path / "tiny.covid3d")
  scans = ["mr", "ct4", "ct5", "enhanced.dcm", "enhanced_folder", "noise.nii.gz", "phantom"]
  paths = [str(inputs / s) for s in scans]
  assert infer.main([f"--model={model}", f"--out={tmp_path / 'out'}", *paths]) == 1
  rows = read_table(tmp_path / "out" / "predictions.csv")
  error = {s: rows[str(inputs / s)]["error"] for s in scans}
  assert error["mr"].startswith("MR series: covid3d reads CT only")
  assert error["ct4"].startswith("4 slices covering 20 mm; a chest CT has at least 20 slices")
  assert error["ct5"].startswith("5 slices covering 25 mm")
  assert "slices of 16x16 pixels" in error["ct5"]
  # The enhanced CT reads as a 2-slice volume, as a file and in a folder.
  assert error["enhanced.dcm"] == error["enhanced_folder"]
  assert error["enhanced.dcm"].startswith("2 slices covering 10 mm")
  assert error["noise.nii.gz"].startswith("looks like noise")
  assert error["phantom"] == "" and rows[str(inputs / "phantom")]["prediction"] in NAMES

  # --accept-any predicts them all, the problems in the warning column.
  assert infer.main([f"--model={model}", f"--out={tmp_path / 'any'}", "--accept-any",
                     *paths]) == 0
  rows = read_table(tmp_path / "any" / "predictions.csv")
  assert all(r["prediction"] in NAMES and not r["error"] for r in rows.values())
  assert [rows[p]["warning"] for p in paths] == [*error.values()]


def test_an_orientation_is_brought_to_the_training_one(tmp_path):
  """The same phantom chest stored with rows running anterior and slices feet-wards reads
  as the same volume (canonical LPS); both pass the checks."""
  plain = readers.read_path(phantom_series(tmp_path / "plain"))
  turned = readers.read_path(phantom_series(tmp_path / "turned", (1, 0, 0, 0, -1, 0)))
  np.testing.assert_array_equal(turned.volume, plain.volume)
  np.testing.assert_allclose(turned.spacing, plain.spacing, rtol=1e-6)
  assert acceptance.problems(plain) == [] and acceptance.problems(turned) == []
  assert plain.meta["modality"] == "CT"


def test_uneven_slices_are_resampled_by_position_and_missing_ones_refused(tmp_path):
  """5 mm slices with a stretch at 2.5 mm: resampled onto 5 mm by position (said in the
  warning), never stretched; a 40 mm gap is refused."""
  hu, _, info = phantom.make_scan(1, kind="non-covid", shape=(48, 64, 64))
  where = np.concatenate([np.arange(20) * 5.0, 97.5 + np.arange(8) * 2.5,
                          117.5 + 5 * np.arange(1, 21)])
  dicom_fixtures.write_series(tmp_path / "uneven", len(where), pixels=hu, positions=where,
                              pixel_mm=info["spacing"][1])
  scan = readers.read_path(tmp_path / "uneven")
  assert scan.spacing[0] == pytest.approx(5.0)
  assert scan.volume.shape[0] == round((where[-1] - where[0]) / 5.0) + 1
  assert "resampled by position to 5.00 mm" in scan.meta["resampled"]
  # A slice at 5 mm steps is unchanged.
  np.testing.assert_allclose(scan.volume[3], read_common.hu_to_unit(np.round(hu[3])), atol=1e-6)
  gap = np.concatenate([np.arange(20) * 5.0, 135.0 + np.arange(20) * 5.0])
  dicom_fixtures.write_series(tmp_path / "gap", len(gap), pixels=hu, positions=gap,
                              pixel_mm=info["spacing"][1])
  with pytest.raises(readers.DataError, match="a gap of 40.0 mm between slices 19 and 20"):
    readers.read_path(tmp_path / "gap")


def test_the_phantom_slice_folders_pass_and_noise_does_not(tmp_path):
  """8-bit slice folders (COV19-CT-DB's form): the phantom passes, as does a scan whose
  slices are stored upside down; uniform noise is refused."""
  hu, _, _ = phantom.make_scan(2, kind="covid", severity=3, shape=(40, 64, 64))
  gray = phantom_writers.jpeg_window(hu)
  write_slices(tmp_path / "phantom", gray)
  write_slices(tmp_path / "upside_down", gray[:, ::-1])
  noise = np.random.default_rng(1).integers(0, 256, (40, 64, 64))
  write_slices(tmp_path / "noise", noise)
  for name in ("phantom", "upside_down"):
    assert acceptance.problems(readers.read_path(tmp_path / name)) == [], name
  assert acceptance.problems(readers.read_path(tmp_path / "noise"))[0].startswith(
      "looks like noise")


def test_folds_that_disagree_are_flagged(tmp_path):
  """Different classes, or the predicted class's probability spread over more than 0.3."""
  assert infer.fold_disagreement([[0.7, 0.3], [0.6, 0.4]], ("a", "b")) == ""
  assert infer.fold_disagreement([[0.7, 0.3], [0.4, 0.6], [0.8, 0.2]], ("a", "b")) == \
      "folds predict a (2), b (1)"
  assert infer.fold_disagreement([[0.95, 0.05], [0.6, 0.4]], ("a", "b")) == \
      "p(a) from 0.60 to 0.95 across the folds"
  assert infer.fold_disagreement(None, ("a", "b")).startswith("n/a")
  folds = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], np.float32)

  def fold_fn(x):
    return np.repeat(folds[:, None], len(x), axis=1)
  predictor = export.Predictor(lambda x: fold_fn(x).mean(0), NAMES, 16, (0, 1), fold_fn)
  scan = phantom_series(tmp_path / "scan")
  rows = infer.predict_scans(predictor, [scan], tmp_path / "out")
  np.testing.assert_allclose(rows[0].probs, folds.mean(0))
  assert rows[0].disagreement == "folds predict mild (1), critical (1)"


def test_max_voxels_refuses_a_scan_from_its_header(inputs, tmp_path):
  model = write_model(tmp_path / "tiny.covid3d")
  assert infer.main([f"--model={model}", f"--out={tmp_path / 'out'}", "--max-voxels=100000",
                     str(inputs / "phantom")]) == 1
  row = read_table(tmp_path / "out" / "predictions.csv")[str(inputs / "phantom")]
  assert row["error"] == ("40 slices of 64x64 is 163,840 voxels, more than the 100,000 allowed "
                          "(infer --max-voxels)")


def test_a_real_head_ct_is_refused_for_want_of_lungs(tmp_path):
  """pydicom's 693_J2KI.dcm, a real head CT slice (JPEG 2000), as a 30-slice series of
  245 mm x 150 mm: a CT of the size of a chest, in HU, an image, but no lungs."""
  dicom_fixtures.write_series(tmp_path / "head", 30, name="693_J2KI.dcm")
  scan = readers.read_path(tmp_path / "head")
  assert scan.volume.shape == (30, 512, 512)
  assert acceptance.problems(scan) == ["no lungs: no air-filled tissue inside the body"]
