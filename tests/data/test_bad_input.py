"""Bad input: strict mode raises DataError naming the file; otherwise a logged skip."""
import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from covid3d.data import preprocess, readers
from covid3d.data.read_common import hu_to_unit
from covid3d.data.skips import DataError, SkipLog
from tests import data_fixtures as fx


def check_rejected(run, path, reason, what="scan"):
  """`run(strict, skips)` raises DataError for `path` when strict; else logs one skip.

  Returns what the non-strict run returned.
  """
  with pytest.raises(DataError) as err:
    run(True, SkipLog())
  assert err.value.path == str(path) and reason in err.value.reason
  assert str(path) in str(err.value)
  skips = SkipLog()
  result = run(False, skips)
  hits = [e for e in skips.entries if e.path == str(path)]
  assert len(hits) == 1 and hits[0].what == what and reason in hits[0].reason, skips.summary()
  return result


def _jpeg_scan(tmp_path, n=4):
  folder = tmp_path / "test" / "ct_scan_0"
  fx.write_slices(folder, fx.ramp_scan(n))
  return folder


def _load_test_scan(tmp_path):
  return lambda strict, skips: readers.load_scan(
      readers.list_cov19ctdb(tmp_path, "test", strict=strict, skips=skips)[0],
      strict=strict, skips=skips)


def test_corrupt_jpeg(tmp_path):
  folder = _jpeg_scan(tmp_path)
  (folder / "2.jpg").write_bytes(b"this is not a JPEG file at all")
  scan = check_rejected(_load_test_scan(tmp_path), folder / "2.jpg", "unreadable image", "slice")
  np.testing.assert_allclose(scan.volume[:, 0, 0] * 255, [0, 10, 30], atol=1e-4)


def test_truncated_jpeg(tmp_path):
  folder = _jpeg_scan(tmp_path)
  noise = np.random.default_rng(0).integers(0, 255, (1, 32, 32))
  fx.write_slices(folder, noise, names=["1.jpg"])  # big enough to cut inside the image data
  data = (folder / "1.jpg").read_bytes()
  (folder / "1.jpg").write_bytes(data[:len(data) * 3 // 4])
  scan = check_rejected(_load_test_scan(tmp_path), folder / "1.jpg", "corrupt or truncated",
                        "slice")
  assert scan.volume.shape[0] == 3


def test_empty_scan_folder(tmp_path):
  _jpeg_scan(tmp_path)
  (tmp_path / "test" / "ct_scan_9").mkdir()
  refs = check_rejected(lambda strict, skips: readers.list_cov19ctdb(
      tmp_path, "test", strict=strict, skips=skips), tmp_path / "test" / "ct_scan_9", "empty")
  assert [r.scan_id for r in refs] == ["ct_scan_0"]


def test_one_slice_scan(tmp_path):
  _jpeg_scan(tmp_path)
  fx.write_slices(tmp_path / "test" / "ct_scan_3", fx.ramp_scan(1))
  refs = check_rejected(lambda strict, skips: readers.list_cov19ctdb(
      tmp_path, "test", strict=strict, skips=skips), tmp_path / "test" / "ct_scan_3", "one")
  assert [r.scan_id for r in refs] == ["ct_scan_0"]


def test_one_slice_nifti(tmp_path):
  path = fx.write_nifti(tmp_path / "a_ct.nii.gz", fx.hu_volume((1, 8, 8)).T, np.eye(4))
  check_rejected(lambda strict, skips: readers.load_scan(
      readers.list_lesions(tmp_path)[0], strict=strict, skips=skips), path, "at least 2")


@pytest.mark.parametrize("strict", [False, True])
def test_stray_files_are_logged_never_fatal(tmp_path, strict):
  folder = _jpeg_scan(tmp_path)
  strays = [folder / ".DS_Store", folder / "Thumbs.db", folder / "notes.txt",
            tmp_path / "test" / "readme.txt"]
  for p in strays:
    p.write_bytes(b"\x00junk")
  skips = SkipLog()
  refs = readers.list_cov19ctdb(tmp_path, "test", strict=strict, skips=skips)
  assert len(readers.load_scan(refs[0], strict=strict, skips=skips).volume) == 4
  assert sorted(e.path for e in skips.entries) == sorted(map(str, strays))
  assert {e.what for e in skips.entries} == {"file"}


def test_nan_and_inf_voxels(tmp_path):
  hu = fx.hu_volume((4, 8, 8))
  hu[1, 2, 3], hu[2, 0, 0] = np.nan, np.inf
  path = fx.write_nifti(tmp_path / "a_ct.nii.gz", hu.T, np.eye(4), np.float32)
  result = check_rejected(lambda strict, skips: readers.load_scan(
      readers.list_lesions(tmp_path)[0], strict=strict, skips=skips), path, "2 NaN or infinite")
  assert result is None


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def test_truncated_nifti(tmp_path):
  path = fx.write_nifti(tmp_path / "a_ct.nii.gz", fx.hu_volume().T, np.eye(4))
  _truncate(path)
  assert check_rejected(lambda strict, skips: readers.load_scan(
      readers.list_lesions(tmp_path)[0], strict=strict, skips=skips), path, "truncated") is None


def test_truncated_mha(tmp_path):
  fx.write_stoic(tmp_path, {"1": fx.hu_volume(), "2": fx.hu_volume()}, {"1": (1, 0), "2": (0, 0)})
  path = tmp_path / "data" / "mha" / "2.mha"
  _truncate(path)
  assert check_rejected(lambda strict, skips: readers.load_scan(
      readers.list_stoic(tmp_path)[1], strict=strict, skips=skips), path, "truncated") is None


@pytest.mark.parametrize("rows,line,reason,severities", [
    ("ct_scan_0;3\nct_scan_99;2", 3, "names scan 'ct_scan_99'", (2, None)),  # no such scan
    ("ct_scan_0;\nct_scan_1;1", 2, "no valid severity", (None, 0)),  # scan without a label
    ("ct_scan_0;3\nct_scan_0;4", 3, "duplicate row", (2, None)),
], ids=["missing_scan", "no_label", "duplicate_row"])
def test_bad_severity_csv(tmp_path, rows, line, reason, severities):
  fx.write_cov19ctdb(tmp_path, csv_text=f"Name;Category\n{rows}\n")
  csv = tmp_path / "train_partition_covid_categories.csv"
  refs = check_rejected(lambda strict, skips: readers.list_cov19ctdb(
      tmp_path, "train", strict=strict, skips=skips), f"{csv}:{line}", reason, "label")
  got = {r.scan_id: r.labels.get("severity") for r in refs}
  assert (got["covid/ct_scan_0"], got["covid/ct_scan_1"]) == severities


def test_stoic_scan_without_label(tmp_path):
  fx.write_stoic(tmp_path, {"1": fx.hu_volume(), "2": fx.hu_volume()}, {"1": (1, 1)})
  refs = check_rejected(lambda strict, skips: readers.list_stoic(
      tmp_path, strict=strict, skips=skips), tmp_path / "data" / "mha" / "2.mha", "no label")
  assert [r.scan_id for r in refs] == ["1"]


def test_stoic_label_for_missing_scan(tmp_path):
  fx.write_stoic(tmp_path, {"1": fx.hu_volume()}, {"1": (1, 1), "5": (0, 0)})
  csv = tmp_path / "metadata" / "reference.csv"
  refs = check_rejected(lambda strict, skips: readers.list_stoic(
      tmp_path, strict=strict, skips=skips), f"{csv}:3", "patient '5'", "label")
  assert [r.scan_id for r in refs] == ["1"]


def test_duplicate_scan_ids(tmp_path):
  fx.write_nifti(tmp_path / "a_ct.nii.gz", fx.hu_volume().T, np.eye(4))
  with gzip.open(tmp_path / "a_ct.nii.gz") as f:
    (tmp_path / "a_ct.nii").write_bytes(f.read())
  refs = check_rejected(lambda strict, skips: readers.list_lesions(
      tmp_path, strict=strict, skips=skips), tmp_path / "a_ct.nii.gz", "duplicate scan id")
  assert [r.paths for r in refs] == [(str(tmp_path / "a_ct.nii"),)]


def test_build_cache_summary_and_skips_json(tmp_path, capsys):
  folder = _jpeg_scan(tmp_path)
  fx.write_slices(tmp_path / "test" / "ct_scan_1", fx.ramp_scan(3))
  (tmp_path / "test" / "ct_scan_1" / "0.jpg").write_bytes(b"junk")
  (tmp_path / "test" / "ct_scan_1" / "1.jpg").write_bytes(b"junk")
  (folder / "Thumbs.db").write_bytes(b"x")
  skips = SkipLog()
  refs = readers.list_cov19ctdb(tmp_path, "test", skips=skips)
  paths = preprocess.build_cache(refs, tmp_path / "cache", (16,), workers=1, skips=skips,
                                 progress=False, workdir=tmp_path / "work")
  assert len(paths) == 1
  out = capsys.readouterr().out
  assert "1 skipped" in out and "Thumbs.db" in out and str(tmp_path / "test" / "ct_scan_1") in out
  report = json.loads((tmp_path / "work" / "skips.json").read_text())
  assert report["counts"] == {"file": 1, "slice": 2, "scan": 1}
  assert [(e["what"], e["path"]) for e in report["skips"]][-1] == (
      "scan", str(tmp_path / "test" / "ct_scan_1"))


def test_build_cache_strict_raises(tmp_path):
  folder = _jpeg_scan(tmp_path)
  (folder / "0.jpg").write_bytes(b"junk")
  refs = readers.list_cov19ctdb(tmp_path, "test")
  with pytest.raises(DataError, match="0.jpg"):
    preprocess.build_cache(refs, tmp_path / "cache", (16,), workers=1, strict=True,
                           progress=False)


def test_data_error_survives_pickling():  # worker processes send it to the parent
  err = pickle.loads(pickle.dumps(DataError("/x/1.jpg", "bad")))
  assert (err.path, err.reason, str(err)) == ("/x/1.jpg", "bad", "/x/1.jpg: bad")


def test_upper_case_extensions_are_read(tmp_path):
  hu = fx.hu_volume((4, 8, 8))
  fx.write_stoic(tmp_path / "s", {"110": hu}, {"110": (1, 0)})
  mha = tmp_path / "s" / "data" / "mha"
  (mha / "110.mha").rename(mha / "110.MHA")
  (tmp_path / "l").mkdir()
  fx.write_nifti(tmp_path / "l" / "b_CT.NII.GZ", hu.T, fx.lps_affine((1., 1., 1.)))
  fx.write_slices(tmp_path / "c" / "test" / "ct_scan_0", fx.ramp_scan(3),
                  names=["0.JPG", "1.JPEG", "2.jpg"])
  skips = SkipLog()
  refs = (readers.list_stoic(tmp_path / "s", skips=skips)
          + readers.list_lesions(tmp_path / "l", skips=skips)
          + readers.list_cov19ctdb(tmp_path / "c", "test", skips=skips))
  assert [(r.dataset, r.scan_id) for r in refs] == [("stoic", "110"), ("lesions", "b"),
                                                    ("cov19ctdb", "ct_scan_0")]
  scans = [readers.load_scan(r, strict=True, skips=skips) for r in refs]
  np.testing.assert_array_equal(scans[0].volume, hu_to_unit(hu))
  np.testing.assert_array_equal(scans[1].volume, hu_to_unit(hu))
  assert scans[2].volume.shape == (3, 32, 32)
  assert len(skips) == 0, skips.summary()


@pytest.mark.parametrize("bad", [None, "110.mha", "110.MHA"])
def test_one_scan_in_two_cases_keeps_the_readable_one(tmp_path, bad):
  hu = fx.hu_volume((4, 8, 8))
  fx.write_stoic(tmp_path, {"110": hu}, {"110": (1, 0)})
  mha = tmp_path / "data" / "mha"
  (mha / "110.MHA").write_bytes((mha / "110.mha").read_bytes())
  if bad:
    (mha / bad).write_bytes(b"not an image at all")
  good = "110.mha" if bad != "110.mha" else "110.MHA"
  other = "110.MHA" if good == "110.mha" else "110.mha"
  skips = SkipLog()
  refs = readers.list_stoic(tmp_path, skips=skips)
  assert [r.paths for r in refs] == [(str(mha / good),)]
  np.testing.assert_array_equal(readers.load_scan(refs[0], strict=True).volume, hu_to_unit(hu))
  assert [(e.path, e.what) for e in skips] == [(str(mha / other), "scan")]
  assert "duplicate scan id" in skips.entries[0].reason and good in skips.entries[0].reason
  assert ("image header is unreadable" in skips.entries[0].reason) == (bad is not None)
  assert [(r.offered, r.used, r.skipped) for r in skips.ledger()] == [(2, 0, 1)]


def test_scan_without_class_folder_is_reported(tmp_path):
  fx.write_cov19ctdb(tmp_path)
  fx.write_slices(tmp_path / "train" / "ct_scan_4", fx.ramp_scan(3))
  for strict in (False, True):  # a note: never fatal
    skips = SkipLog()
    refs = {r.scan_id: r for r in readers.list_cov19ctdb(tmp_path, "train", strict=strict,
                                                          skips=skips)}
    assert refs["ct_scan_4"].labels == {} and len(refs) == 5
    assert [(e.path, e.what, e.dataset, e.partition) for e in skips] == [
        (str(tmp_path / "train" / "ct_scan_4"), "label", "cov19ctdb", "train")]
    assert "no class folder" in skips.entries[0].reason
    assert "no covid label" in skips.entries[0].reason
  skips = SkipLog()
  readers.list_cov19ctdb(tmp_path, "test", skips=skips)  # unlabelled by design: no note
  assert len(skips) == 0


def test_two_files_of_one_slice_number(tmp_path):
  folder = _jpeg_scan(tmp_path)  # 0.jpg .. 3.jpg, slice k = 10 k
  fx.write_slices(folder, np.full((2, 32, 32), 200, np.uint8), names=["01.jpg", "002.jpg"])
  scan = check_rejected(_load_test_scan(tmp_path), folder / "01.jpg", "slice number 1 twice",
                        "slice")
  np.testing.assert_allclose(scan.volume[:, 0, 0] * 255, [0, 10, 20, 30], atol=1e-4)
  assert scan.meta["slices"] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
  skips = SkipLog()
  readers.list_cov19ctdb(tmp_path, "test", skips=skips)
  assert [Path(e.path).name for e in skips] == ["01.jpg", "002.jpg"]
  assert "1.jpg and 01.jpg" in skips.entries[0].reason
  # Without the plain name, the first by file name is used.
  (folder / "1.jpg").unlink()
  refs = readers.list_cov19ctdb(tmp_path, "test", skips=SkipLog())
  assert [Path(p).name for p in refs[0].paths] == ["0.jpg", "01.jpg", "2.jpg", "3.jpg"]
