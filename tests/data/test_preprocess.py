"""Resampling, records and the content-keyed cache."""
import os

import numpy as np
import pytest
import scipy.ndimage

from covid3d.data import cache, pipeline, preprocess, readers, schema
from covid3d.data.scan import Scan
from covid3d.data.skips import SkipLog
from tests import data_fixtures as fx

SIZES = (32, 24)


def _zoom(x, shape, order):
  return scipy.ndimage.zoom(x, np.divide(shape, x.shape), order=order, mode="mirror",
                            grid_mode=False)


@pytest.mark.parametrize("shape_in,shape_out", [((9, 20, 17), (16, 16, 16)),
                                                 ((16, 40, 40), (24, 24, 24)),
                                                 ((2, 5, 33), (7, 6, 4))])
def test_resample_cubic_equals_scipy_zoom(shape_in, shape_out):
  x = np.random.default_rng(0).random(shape_in).astype(np.float32)
  got = preprocess.resample(x, shape_out, order=3)
  assert got.shape == shape_out and got.dtype == np.float32
  np.testing.assert_allclose(got, _zoom(x.astype(np.float64), shape_out, 3), atol=2e-5)


def test_resample_nearest_equals_scipy_zoom():
  m = np.random.default_rng(1).integers(0, 3, (11, 23, 17)).astype(np.uint8)
  for shape in ((32, 32, 32), (5, 8, 9)):
    got = preprocess.resample(m, shape, order=0)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, _zoom(m, shape, 0))


def _scan(mask=True, labels=None):
  rng = np.random.default_rng(2)
  vol = (rng.random((10, 20, 18)) > 0.5).astype(np.float32)  # edges make the spline overshoot
  return Scan("s1", vol, (1., 1., 1.), (0., 0., 0.), np.eye(3), labels or {"covid": 1},
              mask=(vol > 0).astype(np.uint8) if mask else None)


def test_preprocess_scan_record():
  scan = _scan()
  rec = preprocess.preprocess_scan(scan, SIZES)
  for s in SIZES:
    raw = _zoom(scan.volume.astype(np.float64), (s,) * 3, 3)
    assert raw.max() > 1 and raw.min() < 0  # the clip below is exercised
    v = rec[f"volume_{s}"]
    assert v.dtype == np.float16 and v.shape == (s, s, s)
    np.testing.assert_allclose(v, np.clip(raw, 0, 1), atol=1e-3)
    np.testing.assert_array_equal(rec[f"mask_{s}"], _zoom(scan.mask, (s,) * 3, 0))
  assert (rec["scan_id"], rec["has_mask"], rec["covid"], rec["severity"], rec["stoic_severe"]) == (
      "s1", 1, 1, -1, -1)
  bare = preprocess.preprocess_scan(_scan(mask=False, labels={"severity": 2}), (16,))
  assert bare["has_mask"] == 0 and not bare["mask_16"].any() and bare["severity"] == 2
  assert bare["mask_16"].shape == (16, 16, 16) and "volume_32" not in bare


def _tree(root):
  fx.write_cov19ctdb(root)
  return readers.list_cov19ctdb(root, "train")


def _mtimes(paths):
  return [os.stat(p).st_mtime_ns for p in paths]


def test_build_cache_reuses_and_rebuilds(tmp_path, capsys):
  refs = _tree(tmp_path / "data")
  out = tmp_path / "cache"
  paths = preprocess.build_cache(refs, out, SIZES, workers=1, progress=False)
  assert len(paths) == len(refs) and len(set(paths)) == len(refs)
  for ref, path in zip(refs, paths, strict=True):
    expect = preprocess.preprocess_scan(readers.load_scan(ref), SIZES)
    got = preprocess.read_record(path)
    assert sorted(got) == sorted(expect)
    for k in expect:
      np.testing.assert_array_equal(got[k], expect[k])
  assert "4 preprocessed" in capsys.readouterr().out
  index = cache.read_index(out)
  assert [(r["scan_id"], r["covid"], r["severity"], r["has_mask"], r["file"]) for r in index] == [
      (r.scan_id, r.labels["covid"], r.labels.get("severity", -1), 0, os.path.basename(p))
      for r, p in zip(refs, paths, strict=True)]
  assert not [f for f in os.listdir(out) if ".tmp" in f]
  before = _mtimes(paths)
  # A rerun finds every scan.
  assert preprocess.build_cache(refs, out, SIZES, workers=1, progress=False) == paths
  assert _mtimes(paths) == before and "4 from the cache" in capsys.readouterr().out
  # Changed slice bytes rebuild that scan only.
  fx.write_slices(tmp_path / "data" / "train" / "covid" / "ct_scan_1", fx.ramp_scan(8, step=21))
  again = preprocess.build_cache(readers.list_cov19ctdb(tmp_path / "data", "train"), out, SIZES,
                                 workers=1, progress=False)
  changed = [a != b for a, b in zip(again, paths, strict=True)]
  assert changed == [r.scan_id == "covid/ct_scan_1" for r in refs]
  # Other settings rebuild everything.
  other = preprocess.build_cache(refs, out, (16,), workers=1, progress=False)
  assert not set(other) & set(paths)
  assert preprocess.read_record(other[0])["volume_16"].shape == (16, 16, 16)


def test_cache_key_depends_on_labels_and_settings(tmp_path):
  ref = _tree(tmp_path)[0]
  key = cache.cache_key(ref, preprocess.settings(SIZES))
  assert key == cache.cache_key(ref, preprocess.settings(SIZES))
  assert key != cache.cache_key(ref, preprocess.settings((32,)))
  relabelled = readers.ScanRef(ref.dataset, ref.scan_id, ref.paths, {"covid": 0}, ref.partition)
  assert key != cache.cache_key(relabelled, preprocess.settings(SIZES))


def test_build_cache_parallel_equals_serial(tmp_path):
  refs = _tree(tmp_path / "data")
  skips = SkipLog()
  serial = preprocess.build_cache(refs, tmp_path / "a", SIZES, workers=1, progress=False)
  parallel = preprocess.build_cache(refs, tmp_path / "b", SIZES, workers=2, skips=skips,
                                    progress=False)
  assert [os.path.basename(p) for p in serial] == [os.path.basename(p) for p in parallel]
  for a, b in zip(serial, parallel, strict=True):
    assert open(a, "rb").read() == open(b, "rb").read()
  assert len(skips) == 0


@pytest.mark.parametrize("compressed", [False, True])
def test_read_npz_equals_np_load(tmp_path, compressed):
  """The thread-safe reader of record and mask files gives np.load's arrays."""
  arrays = {"volume_8": np.random.default_rng(0).random((8, 8, 8)).astype(np.float16),
            "mask_8": (np.arange(512).reshape(8, 8, 8) % 3 == 0).astype(np.uint8),
            "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "scalar": np.int32(7)}
  path = tmp_path / "r.npz"
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  with open(path, "rb") as f:
    for got in (cache.read_npz(str(path)), cache.read_npz(f)):
      assert set(got) == set(arrays)
      for k, v in arrays.items():
        assert got[k].dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(got[k], v)


def test_record_files_are_read_by_field_memory_mapped(tmp_path):
  """A record: its JSON file and one .npy per array; a reader opens only what it looks up."""
  refs = _tree(tmp_path / "data")
  paths = preprocess.build_cache(refs, tmp_path / "cache", SIZES, workers=1, progress=False)
  path = paths[0]
  stem = os.path.basename(path).removesuffix(cache.RECORD_SUFFIX)
  names = sorted(n for n in os.listdir(tmp_path / "cache") if n.startswith(stem))
  assert names == [f"{stem}.record.json", f"{stem}.volume_24.npy",
                   f"{stem}.volume_32.npy"]  # no masks
  expect = preprocess.preprocess_scan(readers.load_scan(refs[0]), SIZES)
  os.remove(cache.array_file(path, "volume_32"))  # a stage of 24^3 never opens it
  record = preprocess.read_record(path)
  volume = record["volume_24"]
  assert isinstance(volume, np.memmap) and not volume.flags.writeable
  np.testing.assert_array_equal(volume, expect["volume_24"])
  assert not record["mask_24"].any() and record["mask_32"].shape == (32,) * 3
  assert (record["scan_id"], record["covid"], record["has_mask"]) == (refs[0].scan_id, 1, 0)
  source = pipeline.file_source(paths)
  batch = next(iter(pipeline.host_dataset(source, np.arange(len(paths)), global_batch_size=2,
                                          fields={"image": "volume_24", "mask": "mask_24"},
                                          train=True, volume_dtype=None)))
  assert batch["image"].dtype == np.float16 and batch["mask"].shape == (2, 24, 24, 24, 1)
  with pytest.raises(FileNotFoundError):
    record["volume_32"]  # pylint: disable=pointless-statement


def test_uint8_records_round_to_the_nearest_step(tmp_path):
  scan = _scan()
  f16 = preprocess.preprocess_scan(scan, SIZES)
  u8 = preprocess.preprocess_scan(scan, SIZES, "uint8")
  for s in SIZES:
    exact = np.clip(preprocess.resample(scan.volume, (s,) * 3), 0, 1)
    assert u8[f"volume_{s}"].dtype == np.uint8
    decoded = schema.decode_volume(u8[f"volume_{s}"])
    assert np.abs(decoded - exact).max() <= 0.5 / 255 + 1e-7
    assert np.abs(decoded - f16[f"volume_{s}"].astype(np.float32)).max() < 0.5 / 255 + 2 ** -11
    np.testing.assert_array_equal(u8[f"mask_{s}"], f16[f"mask_{s}"])
  ref = _tree(tmp_path)[0]
  keys = {d: cache.cache_key(ref, preprocess.settings(SIZES, d)) for d in ("float16", "uint8")}
  assert keys["float16"] != keys["uint8"]
  with pytest.raises(ValueError, match="record dtype 'int8'"):
    preprocess.build_cache([ref], tmp_path / "c", SIZES, workers=1, progress=False, dtype="int8")
  path, = preprocess.build_cache([ref], tmp_path / "c", SIZES, workers=1, progress=False,
                                 dtype="uint8")
  assert preprocess.read_record(path)["volume_24"].dtype == np.uint8
  batch = next(iter(pipeline.host_dataset(pipeline.file_source([path]), np.arange(1),
                                          global_batch_size=1, fields=("volume_24",),
                                          train=False)))  # evaluation batches: float32 [0, 1]
  np.testing.assert_array_equal(batch["volume_24"][0, ..., 0], schema.decode_volume(
      preprocess.read_record(path)["volume_24"]))
