"""Tests of the synthetic chest-CT phantom and its writers for the real formats."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from covid3d.data import phantom, phantom_writers as writers
from covid3d.data.phantom import TISSUES, make_scan

SHAPE = (24, 64, 64)


def _code(name):
  return TISSUES[name][0]


@pytest.fixture(scope="module")
def severe_clean():
  return make_scan(5, kind="covid", severity=2, shape=(32, 96, 96), noise_hu=0.0)


def test_deterministic_by_seed():
  a = make_scan(3, kind="covid", severity=1, shape=SHAPE)
  b = make_scan(3, kind="covid", severity=1, shape=SHAPE)
  c = make_scan(4, kind="covid", severity=1, shape=SHAPE)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[2]["lesion_fraction"] == b[2]["lesion_fraction"]
  assert not np.array_equal(a[0], c[0])


def test_shapes_dtypes_and_drawn_sizes():
  vol, mask, info = make_scan(0, kind="covid", shape=(20, 40, 48))
  assert vol.shape == mask.shape == info["tissue"].shape == (20, 40, 48)
  assert vol.dtype == np.float32 and mask.dtype == np.uint8 and info["tissue"].dtype == np.uint8
  assert set(np.unique(mask)) <= {0, 1}
  assert phantom.HU_RANGE[0] <= vol.min() and vol.max() <= phantom.HU_RANGE[1]
  vol, _, info = make_scan(1, kind="non-covid")
  d, h, w = vol.shape
  assert 40 <= d <= 90 and h == w and 64 <= h <= 128 and h % 16 == 0
  sz, sy, sx = info["spacing"]
  # The field of view is 340-390 mm and the volume 270-330 mm high, whatever the size.
  assert 340 <= sx * w <= 390 and sy == sx and 270 <= sz * d <= 330


def test_tissue_hu(severe_clean):
  vol, _, info = severe_clean
  tissue = info["tissue"]
  tolerance = {"lung": 60.0}
  for name in ("air", "fat", "soft", "lung", "marrow", "liver"):
    core = ndimage.binary_erosion(tissue == _code(name))   # away from blurred edges
    assert core.sum() > 50, name
    nominal = TISSUES[name][1]
    assert abs(np.median(vol[core]) - nominal) <= tolerance.get(name, 5.0), name
  bone = vol[tissue == _code("bone")]
  assert 550 <= np.percentile(bone, 95) <= 720
  ggo = vol[ndimage.binary_erosion(tissue == _code("ggo"))]
  assert -640 <= np.median(ggo) <= -300
  assert -100 <= np.median(vol[tissue == _code("consolidation")]) <= 50
  # Air outside the body is -1000 and the table is there.
  assert vol[0, 0, 0] == -1000.0
  assert (tissue == _code("table")).any()


def test_noise_level(severe_clean):
  noisy, _, info = make_scan(5, kind="covid", severity=2, shape=(32, 96, 96), noise_hu=20.0)
  inside = info["tissue"] != _code("air")       # no clipping at -1024 there
  diff = (noisy - severe_clean[0])[inside]
  assert abs(diff.std() - 20.0) < 0.5 and abs(diff.mean()) < 0.5


@pytest.mark.parametrize("severity", range(4))
def test_severity_follows_lesion_fraction(severity):
  _, mask, info = make_scan(severity + 10, kind="covid", severity=severity, shape=SHAPE)
  fraction = mask.sum() / info["lung_voxels"]
  assert fraction == pytest.approx(info["lesion_fraction"])
  lo, hi = phantom.TARGET_FRACTIONS[severity]
  assert lo - 0.005 <= fraction <= hi + 0.005
  assert phantom.severity_from_fraction(fraction) == severity == info["severity"]


def test_severity_thresholds():
  got = [phantom.severity_from_fraction(f) for f in (0.0, 0.249, 0.25, 0.499, 0.5, 0.749, 0.75, 1)]
  assert got == [0, 0, 1, 1, 2, 2, 3, 3]


def test_lesions_are_in_the_lungs_subpleural_and_grow_inwards():
  lung_codes = [_code(n) for n in ("lung", "ggo", "consolidation", "vessel", "nodule")]
  depth_ratio = []
  for severity in range(4):
    _, mask, info = make_scan(5, kind="covid", severity=severity, shape=(32, 96, 96), noise_hu=0.0)
    lungs = np.isin(info["tissue"], lung_codes)
    assert mask.any() and not (mask.astype(bool) & ~lungs).any()
    depth = ndimage.distance_transform_edt(lungs, sampling=info["spacing"])
    depth_ratio.append(depth[mask > 0].mean() / depth[lungs].mean())
  assert depth_ratio[0] < 0.7  # mild: lesions well under the pleura
  assert np.all(np.diff(depth_ratio) > 0), depth_ratio


def test_severe_has_consolidation(severe_clean):
  assert (severe_clean[2]["tissue"] == _code("consolidation")).any()


def test_mild_has_no_consolidation():
  _, mask, info = make_scan(2, kind="covid", severity=0, shape=SHAPE)
  assert mask.any() and not (info["tissue"] == _code("consolidation")).any()


def test_non_covid():
  vol, mask, info = make_scan(7, kind="non-covid", shape=SHAPE, nodules=2)
  assert not mask.any() and info["lesion_fraction"] == 0.0
  assert info["covid"] == 0 and info["severity"] == -1 and info["nodules"] == 2
  nodule = info["tissue"] == _code("nodule")
  assert nodule.any() and not (info["tissue"] == _code("ggo")).any()
  _, _, info = make_scan(7, kind="non-covid", shape=SHAPE, nodules=0)
  assert info["nodules"] == 0 and not (info["tissue"] == _code("nodule")).any()


@pytest.mark.parametrize("kwargs", [
    {"kind": "healthy"}, {"kind": "non-covid", "severity": 1}, {"kind": "covid", "severity": 4},
    {"kind": "covid", "nodules": 2}, {"kind": "covid", "shape": (8, 64, 64)},
    {"kind": "covid", "shape": SHAPE, "size": 64}])
def test_bad_arguments(kwargs):
  with pytest.raises(ValueError, match="make_scan"):
    make_scan(0, **kwargs)


def test_jpeg_window_matches_the_readers_hu_scaling():
  """A tissue reaches the model at the same value from the JPEG and the HU datasets."""
  from covid3d.data.read_common import hu_to_unit
  hu = np.array([-1200.0, -1000.0, -850.0, -450.0, 40.0, 500.0, 900.0], np.float32)
  np.testing.assert_allclose(writers.jpeg_window(hu) / 255.0, hu_to_unit(hu), atol=0.5 / 255 + 1e-6)


def test_lung_window():
  np.testing.assert_array_equal(phantom.lung_window([-2000, -1350, -600, 150, 400]),
                                [0, 0, 128, 255, 255])


def _read_jpeg_folder(folder):
  names = sorted(p.name for p in folder.iterdir())
  numeric = sorted(names, key=lambda n: int(n.split(".")[0]))
  return names, numeric, [np.asarray(Image.open(folder / n)) for n in numeric]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("phantom")
  kwargs = {"sizes": (32, 40), "slices": (16, 20)}
  counts = {"cov19ctdb": 10, "lesions": 3, "stoic": 4}
  roots = writers.write_all(root, 1, counts, **kwargs)
  with open(root / writers.MANIFEST) as f:
    manifest = json.load(f)
  return root, roots, manifest, kwargs


def test_write_all_layout(written):
  root, roots, manifest, _ = written
  assert roots == {n: root / writers.DATASET_DIRS[n] for n in writers.DATASETS}
  assert {n: len(m) for n, m in manifest["scans"].items()} == {"cov19ctdb": 10, "lesions": 3,
                                                               "stoic": 4}
  with pytest.raises(ValueError, match="unknown datasets"):
    writers.write_all(root / "x", 0, {"mosmed": 1})


def test_cov19ctdb_files(written):
  _, roots, manifest, kwargs = written
  root, records = roots["cov19ctdb"], manifest["scans"]["cov19ctdb"]
  assert sorted(p.name for p in root.iterdir()) == sorted(
      ["train", "validation", "test", *writers.SEVERITY_CSVS.values()])
  assert [sum(r["partition"] == p for r in records) for p, _ in writers.PARTITIONS] == [6, 2, 2]
  assert sorted(p.name for p in (root / "train").iterdir()) == ["covid", "non-covid"]
  for r in records:
    folder = root / r["path"]
    if r["partition"] == "test":
      assert folder.parent == root / "test"
    else:
      assert folder.parent.name == ("covid" if r["covid"] else "non-covid")
    names, numeric, slices = _read_jpeg_folder(folder)
    assert numeric == [f"{k}.jpg" for k in range(r["n_slices"])]
    assert names != numeric                                   # > 10 slices
    assert kwargs["slices"][0] <= len(slices) <= kwargs["slices"][1]
    rgb = slices[0]
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert np.abs(rgb.astype(int) - rgb[..., :1]).max() <= 2  # gray stored as RGB
    sizes = {s.shape[:2] for s in slices}
    if r["inconsistent_slice"] is None:
      assert sizes == {tuple(r["size"])}
    else:
      assert slices[r["inconsistent_slice"]].shape[:2] == tuple(r["inconsistent_size"])
      assert len(sizes) == 2
  assert sum(r["misorientation"] is not None for r in records) == 1
  assert sum(r["inconsistent_slice"] is not None for r in records) == 1


def test_cov19ctdb_pixels_and_orientation(written):
  _, roots, manifest, _ = written
  for r in manifest["scans"]["cov19ctdb"]:
    if r["inconsistent_slice"] is not None:
      continue
    vol, _, _ = make_scan(tuple(r["seed"]), kind="covid" if r["covid"] else "non-covid",
                          severity=r["severity"] if r["covid"] else None,
                          shape=r["shape"])
    expected = writers.jpeg_window(vol)
    if r["misorientation"]:
      expected = writers.MISORIENTATIONS[r["misorientation"]](expected)
    got = np.stack(_read_jpeg_folder(roots["cov19ctdb"] / r["path"])[2])[..., 0]
    assert np.abs(got.astype(float) - expected).mean() < 3.0, r["scan_id"]


def test_cov19ctdb_severity_csvs(written):
  _, roots, manifest, _ = written
  records = manifest["scans"]["cov19ctdb"]
  for partition, name in writers.SEVERITY_CSVS.items():
    with open(roots["cov19ctdb"] / name, newline="") as f:
      rows = list(csv.DictReader(f, delimiter=";"))
    expected = {r["scan_id"]: str(r["severity"] + 1) for r in records
                if r["partition"] == partition and r["covid"]}
    assert {row["Name"]: row["Category"] for row in rows} == expected
    assert all(c in "1234" for c in expected.values())


def _nifti_as_phantom(path):
  """(D, H, W) array of a NIfTI brought to LPS through its affine."""
  img = nib.load(path)
  ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                         nib.orientations.axcodes2ornt(("L", "P", "S")))
  return nib.orientations.apply_orientation(np.asanyarray(img.dataobj), ornt).transpose(2, 1, 0)


def test_lesion_files(written):
  _, roots, manifest, _ = written
  records = manifest["scans"]["lesions"]
  assert sum(r["stored_flip"] is not None for r in records) == 1
  for r in records:
    ct_path = roots["lesions"] / r["path"]
    seg_path = ct_path.with_name(ct_path.name.replace("_ct.nii.gz", "_seg.nii.gz"))
    assert ct_path.parent.name == "Train" and r["scan_id"].startswith("volume-covid19-A-")
    ct, seg = nib.load(ct_path), nib.load(seg_path)
    assert ct.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(ct.affine, seg.affine)
    sz, sy, sx = r["spacing"]
    np.testing.assert_allclose(ct.header.get_zooms(), (sx, sy, sz), rtol=1e-5)
    codes = nib.aff2axcodes(ct.affine)
    assert codes == ("L", "P", "S") if r["stored_flip"] is None else codes != ("L", "P", "S")
    vol, mask, _ = make_scan(tuple(r["seed"]), kind="covid", severity=r["severity"],
                             shape=r["shape"])
    np.testing.assert_array_equal(_nifti_as_phantom(ct_path), np.round(vol).astype(np.int16))
    np.testing.assert_array_equal(_nifti_as_phantom(seg_path), mask)


def test_stoic_files(written):
  _, roots, manifest, _ = written
  records = {r["scan_id"]: r for r in manifest["scans"]["stoic"]}
  with open(roots["stoic"] / "metadata" / "reference.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == ["PatientID", "probCOVID", "probSevere"]
    rows = list(reader)
  assert sorted(row["PatientID"] for row in rows) == sorted(records)
  for row in rows:
    r = records[row["PatientID"]]
    assert row["probCOVID"] == str(r["covid"])
    assert row["probSevere"] == str(int(r["covid"] == 1 and r["severity"] >= 2))
    img = sitk.ReadImage(str(roots["stoic"] / "data" / "mha" / f"{row['PatientID']}.mha"))
    assert img.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(img.GetSpacing(), r["spacing"][::-1])
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel())
    np.testing.assert_allclose(img.GetOrigin(), r["origin"])
    vol, _, _ = make_scan(tuple(r["seed"]), kind="covid" if r["covid"] else "non-covid",
                          severity=r["severity"] if r["covid"] else None, shape=r["shape"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), np.round(vol).astype(np.int16))


def test_writers_deterministic_and_parallel(tmp_path, written):
  _, _, manifest, kwargs = written
  again = writers.write_stoic(tmp_path / "a", 4, 1, workers=2, **kwargs)
  assert json.loads(json.dumps(again)) == manifest["scans"]["stoic"]


def test_plot_and_cli(tmp_path):
  png = tmp_path / "classes.png"
  phantom.plot_classes(png, size=48, n_slices=24)
  assert Image.open(png).size[0] > 300
  writers.main(["--out", str(tmp_path / "ds"), "--n", "1"])
  assert (tmp_path / "ds" / writers.MANIFEST).exists()
  assert len(list((tmp_path / "ds" / "stoic" / "data" / "mha").glob("*.mha"))) == 1
