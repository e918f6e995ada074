"""Readers of COV19-CT-DB (JPEG folders), the lesion set (NIfTI) and STOIC (MHA)."""
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from covid3d.data import phantom_writers, readers
from covid3d.data.read_common import hu_to_unit
from covid3d.data.skips import SkipLog
from tests import data_fixtures as fx


def test_cov19ctdb_listing_labels_and_numeric_slice_order(tmp_path):
  scans = fx.write_cov19ctdb(tmp_path)
  refs = readers.list_cov19ctdb(tmp_path, "train")
  assert [r.scan_id for r in refs] == sorted(scans)
  by_id = {r.scan_id: r for r in refs}
  assert by_id["covid/ct_scan_0"].labels == {"covid": 1, "severity": 2}
  assert by_id["covid/ct_scan_1"].labels == {"covid": 1, "severity": 0}
  assert by_id["covid/ct_scan_2"].labels == {"covid": 1}  # not in the CSV: unknown
  assert by_id["non-covid/ct_scan_0"].labels == {"covid": 0}
  scan = readers.load_scan(by_id["covid/ct_scan_0"])
  assert scan.volume.dtype == np.float32 and scan.volume.shape == (12, 32, 32)
  # 10.jpg and 11.jpg come after 9.jpg, not after 1.jpg.
  np.testing.assert_allclose(scan.volume, scans["covid/ct_scan_0"] / 255.0, atol=1e-6)
  assert scan.spacing == (1.0, 1.0, 1.0)


def test_cov19ctdb_validation_and_test_partitions(tmp_path):
  fx.write_cov19ctdb(tmp_path)
  (tmp_path / "val_partition_covid_categories.csv").write_text("Name;Category\nct_scan_5;4\n")
  val = readers.list_cov19ctdb(tmp_path, "validation")
  assert [(r.scan_id, r.labels) for r in val] == [("covid/ct_scan_5", {"covid": 1, "severity": 3})]
  test = readers.list_cov19ctdb(tmp_path, "test")
  assert [(r.scan_id, r.labels, r.partition) for r in test] == [("ct_scan_7", {}, "test")]


@pytest.mark.parametrize("text,name", [
    ("Name,Category\nct_scan_0,3\nct_scan_1,1\n", "train_severity.csv"),
    ("ct_scan_name\tSeverity\nct_scan_0\t3\nct_scan_1\t1\n",
     "train_partition_covid_categories.csv"),
    ("\ufeffname ; category\nct_scan_0 ; 3\nct_scan_1;1\n", "train_partition_covid_categories.csv"),
])
def test_severity_csv_variants(tmp_path, text, name):
  fx.write_cov19ctdb(tmp_path, csv_text=text, csv_name=name)
  refs = {r.scan_id: r.labels.get("severity") for r in readers.list_cov19ctdb(tmp_path, "train")}
  assert refs == {"covid/ct_scan_0": 2, "covid/ct_scan_1": 0, "covid/ct_scan_2": None,
                  "non-covid/ct_scan_0": None}


def test_gray_decoding_matches_pil_luma(tmp_path):
  rng = np.random.default_rng(0)
  img = (rng.random((5, 32, 32)) * 255).astype(np.uint8)
  paths = fx.write_slices(tmp_path / "train" / "covid" / "ct_scan_0", img, quality=80)
  ref = readers.list_cov19ctdb(tmp_path, "train")[0]
  expect = np.stack([np.asarray(Image.open(p).convert("L")) for p in paths]) / 255.0
  np.testing.assert_allclose(readers.load_scan(ref).volume, expect, atol=1.01 / 255)


def test_inconsistent_slice_is_dropped_and_logged(tmp_path):
  folder = tmp_path / "test" / "ct_scan_0"
  fx.write_slices(folder, fx.ramp_scan(6))
  Image.fromarray(np.full((24, 24), 200, np.uint8)).convert("RGB").save(folder / "3.jpg")
  skips = SkipLog()
  scan = readers.load_scan(readers.list_cov19ctdb(tmp_path, "test")[0], skips=skips)
  np.testing.assert_allclose(scan.volume[:, 0, 0] * 255, [0, 10, 20, 40, 50], atol=1e-4)
  assert scan.meta["slices"] == ["0.jpg", "1.jpg", "2.jpg", "4.jpg", "5.jpg"]
  assert [(e.path, e.what) for e in skips.entries] == [(str(folder / "3.jpg"), "slice")]
  assert "24x24" in skips.entries[0].reason and "32x32" in skips.entries[0].reason


def _canonical_case(tmp_path, hu, layout):
  """Writes `hu` (canonical (z, y, x) LPS) in another voxel layout; returns its path."""
  spacing = (2.5, 0.8, 0.7)
  data, aff = hu.T, fx.lps_affine(spacing)  # (x, y, z), axes L, P, S
  if layout == "RAS":  # flip x and y: voxel 0 is the old last voxel
    corner = aff @ [hu.shape[2] - 1, hu.shape[1] - 1, 0, 1]
    data, aff = data[::-1, ::-1, :], np.diag([0.7, 0.8, 2.5, 1.0])
    aff[:3, 3] = corner[:3]
  elif layout == "permuted":  # file axes (z, x, y)
    data = data.transpose(2, 0, 1)
    aff = aff.copy()
    aff[:, :3] = aff[:, [2, 0, 1]]
  return fx.write_nifti(tmp_path / f"{layout}_ct.nii.gz", data, aff), data, aff


@pytest.mark.parametrize("layout", ["LPS", "RAS", "permuted"])
def test_nifti_orientation_to_canonical(tmp_path, layout):
  hu = fx.hu_volume()
  path, _, _ = _canonical_case(tmp_path, hu, layout)
  ref = readers.list_lesions(tmp_path)[0]
  assert ref.scan_id == layout and ref.mask_path is None
  scan = readers.load_scan(ref)
  np.testing.assert_array_equal(scan.volume, hu_to_unit(hu))
  np.testing.assert_allclose(scan.spacing, (2.5, 0.8, 0.7), rtol=1e-6)
  assert scan.source == str(path)


def test_hu_scaling():
  np.testing.assert_allclose(hu_to_unit(np.array([-2000., -1000., -250., 500., 900.])),
                             [0., 0., 0.5, 1., 1.])


@pytest.mark.parametrize("layout", ["RAS", "permuted"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_write_mask_like_nifti_round_trip(tmp_path, layout, suffix):
  hu = fx.hu_volume()
  path, data, aff = _canonical_case(tmp_path, hu, layout)
  scan = readers.load_scan(readers.list_lesions(tmp_path)[0])
  mask = (np.random.default_rng(1).random(hu.shape) > 0.7).astype(np.uint8)
  out = readers.write_mask_like(mask, scan, tmp_path / "out" / f"mask{suffix}")
  # The mask file's voxels follow the CT file's layout: mask.T laid out like `data`.
  expect = mask.T[::-1, ::-1, :] if layout == "RAS" else mask.T.transpose(2, 0, 1)
  if suffix == ".nii.gz":
    img = nib.load(out)
    np.testing.assert_array_equal(np.asarray(img.dataobj), expect)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
  else:  # geometry as ITK reads the CT NIfTI itself
    ct, img = sitk.ReadImage(str(path)), sitk.ReadImage(out)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).T, expect)
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
      np.testing.assert_allclose(getattr(img, get)(), getattr(ct, get)(), atol=1e-5)
  # And the readers read it back as the same canonical mask.
  ref = dataclasses.replace(readers.list_lesions(tmp_path)[0], mask_path=out)
  np.testing.assert_array_equal(readers.load_scan(ref).mask, mask)


def test_stoic_mha_direction_and_labels(tmp_path):
  hu = fx.hu_volume(seed=3)
  # direction diag(1, -1, 1): the file's rows run towards Anterior, so the file
  # array is the canonical one flipped along y, with the origin at its last row.
  flip = np.diag([1., -1., 1.])
  spacing = (0.8, 0.7, 2.5)
  origin = np.array([1., 2., 3.]) + np.array([0., (hu.shape[1] - 1) * 0.7, 0.])
  fx.write_mha(tmp_path / "data" / "mha" / "17.mha", hu[:, ::-1, :], spacing, origin, flip)
  fx.write_mha(tmp_path / "data" / "mha" / "4.mha", hu)
  (tmp_path / "metadata").mkdir()
  (tmp_path / "metadata" / "reference.csv").write_text(
      "PatientID,probCOVID,probSevere\n4,1,0\n17,1,1\n")
  refs = readers.list_stoic(tmp_path)
  assert [(r.scan_id, r.labels) for r in refs] == [
      ("17", {"stoic_covid": 1, "stoic_severe": 1}), ("4", {"stoic_covid": 1, "stoic_severe": 0})]
  a, b = (readers.load_scan(r) for r in refs)
  np.testing.assert_array_equal(a.volume, hu_to_unit(hu))
  np.testing.assert_array_equal(b.volume, hu_to_unit(hu))
  np.testing.assert_allclose(a.spacing, (2.5, 0.7, 0.8))
  np.testing.assert_allclose(a.direction, flip)
  np.testing.assert_allclose(a.origin, origin)
  mask = (hu > 0).astype(np.uint8)
  out = readers.write_mask_like(mask, a, tmp_path / "m.mha")
  img = sitk.ReadImage(out)
  np.testing.assert_array_equal(sitk.GetArrayFromImage(img), mask[:, ::-1, :])
  np.testing.assert_allclose(img.GetDirection(), flip.ravel())
  np.testing.assert_allclose(img.GetOrigin(), origin)


def test_stoic_patient_as_a_dicom_series(tmp_path):
  """A STOIC-like set whose patient 9 is a DICOM folder reads as its MHA twin does."""
  import locale

  before = locale.setlocale(locale.LC_ALL)
  hu = fx.hu_volume(seed=5)
  fx.write_stoic(tmp_path, {4: hu}, {4: (1, 0), 9: (0, 0)})
  image = sitk.ReadImage(str(tmp_path / "data" / "mha" / "4.mha"))
  phantom_writers.write_dicom_series(image, tmp_path / "data" / "mha" / "9")
  refs = readers.list_stoic(tmp_path)
  assert [r.scan_id for r in refs] == ["4", "9"]
  mha, dicom = (readers.load_scan(r) for r in refs)
  np.testing.assert_array_equal(dicom.volume, mha.volume)
  np.testing.assert_allclose(dicom.spacing, mha.spacing, atol=1e-5)
  np.testing.assert_allclose(dicom.origin, mha.origin, atol=1e-4)
  assert dicom.labels == {"stoic_covid": 0, "stoic_severe": 0}
  assert locale.setlocale(locale.LC_ALL) == before   # GDCM's "C" locale does not leak


def test_a_folder_of_two_dicom_series_reads_the_larger_and_says_so(tmp_path, caplog):
  from covid3d.data import phantom_writers
  hu = fx.hu_volume(seed=6)
  big = sitk.GetImageFromArray(hu.astype(np.int16))
  small = sitk.GetImageFromArray(hu[:3].astype(np.int16) + 100)
  phantom_writers.write_dicom_series(big, tmp_path / "scan")
  phantom_writers.write_dicom_series(small, tmp_path / "other", series_uid="1.2.3.4.5")
  for f in (tmp_path / "other").iterdir():
    f.rename(tmp_path / "scan" / f"small_{f.name}")
  with caplog.at_level("WARNING"):
    scan = readers.read_path(tmp_path / "scan")
  np.testing.assert_array_equal(scan.volume, hu_to_unit(hu))
  assert "2 DICOM series; reading the largest" in caplog.text
  assert f"({hu.shape[0]} slices)" in caplog.text


def test_lesion_pairs_and_jpeg_mask_round_trip(tmp_path):
  hu = fx.hu_volume()
  aff = fx.lps_affine((2.0, 1.0, 1.0))
  mask = (hu > 300).astype(np.uint8)
  (tmp_path / "Train").mkdir()
  fx.write_nifti(tmp_path / "Train" / "a_ct.nii.gz", hu.T, aff)
  fx.write_nifti(tmp_path / "Train" / "a_seg.nii.gz", mask.T, aff, np.uint8)
  ref = readers.list_lesions(tmp_path, "train")[0]
  scan = readers.load_scan(ref)
  np.testing.assert_array_equal(scan.mask, mask)
  # A JPEG scan has the identity geometry; its mask goes out and back unchanged.
  fx.write_slices(tmp_path / "c" / "test" / "ct_scan_1", fx.ramp_scan(4))
  jref = readers.list_cov19ctdb(tmp_path / "c", "test")[0]
  jscan = readers.load_scan(jref)
  jmask = np.zeros(jscan.volume.shape, np.uint8)
  jmask[1, 2:5, 7] = 1
  path = readers.write_mask_like(jmask, jscan, tmp_path / "jmask.nii.gz")
  back = readers.load_scan(dataclasses.replace(jref, mask_path=path))
  np.testing.assert_array_equal(back.mask, jmask)
  with pytest.raises(ValueError, match="shape"):
    readers.write_mask_like(jmask[:2], jscan, tmp_path / "bad.nii.gz")


def test_phantom_through_the_readers(tmp_path):
  roots = phantom_writers.write_all(tmp_path, 0, 5, sizes=(32, 36), slices=(16, 18))
  manifest = json.loads((tmp_path / phantom_writers.MANIFEST).read_text())["scans"]
  skips = SkipLog()
  truth = {(r["partition"], r["scan_id"]): r for r in manifest["cov19ctdb"]}
  for part in ("train", "validation", "test"):
    for ref in readers.list_cov19ctdb(roots["cov19ctdb"], part, skips=skips):
      name = ref.scan_id.split("/")[-1]
      rec = truth[(part, name)]
      if part != "test":
        assert ref.labels["covid"] == rec["covid"]
        assert ref.labels.get("severity", -1) == rec["severity"]
      scan = readers.load_scan(ref, skips=skips)
      n = rec["n_slices"] - (rec["inconsistent_slice"] is not None)
      assert scan.volume.shape == (n, *rec["size"])
  dropped = [e for e in skips.entries if e.what == "slice"]
  assert len(dropped) == sum(r["inconsistent_slice"] is not None for r in truth.values())
  stoic = readers.list_stoic(roots["stoic"])
  assert len(stoic) == len(manifest["stoic"])
  lesions = readers.list_lesions(roots["lesions"])
  assert all(r.mask_path for r in lesions) and len(lesions) == len(manifest["lesions"])
  scan = readers.load_scan(lesions[0])
  assert scan.mask.shape == scan.volume.shape and scan.mask.any()
  assert not [e for e in skips.entries if e.what != "slice"]
