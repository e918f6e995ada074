"""Dataset roots in a bucket (``gs://``), against a real GCS emulator (fake-gcs-server).

The phantom's three dataset folders are written locally and uploaded file by
file, as ``gcloud storage cp -r`` would (objects named by their relative
paths, no folder objects). Then every reader lists the same scans from the
bucket as from the local copy and reads byte-identical volumes, and records
preprocessed from the bucket equal the local ones (same cache keys, same
bytes).
"""
import dataclasses
import os

import numpy as np
import pytest

import gcs_emulator
from covid3d import storage
from covid3d.data import phantom_writers, pipeline, preprocess, readers
from covid3d.data.skips import SkipLog

BUCKET = "covid3d-data"
URL = f"gs://{BUCKET}/phantom"
COUNTS = {"cov19ctdb": 8, "lesions": 3, "stoic": 3}
PARTITIONS = {"cov19ctdb": ("train", "validation", "test"), "lesions": ("train",),
              "stoic": ("train",)}
SIZES = (16, 24)


def upload(local, url):
  """Copies every file under the folder ``local`` to ``url``/<relative path>."""
  for folder, _, files in os.walk(local):
    for name in files:
      rel = os.path.relpath(os.path.join(folder, name), local)
      with open(os.path.join(folder, name), "rb") as f:
        (storage.as_path(url) / rel).write_bytes(f.read())


def _fs():
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  return backend.fsspec_backend.fs(URL)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """(local phantom root, its URL): the phantom written locally and uploaded."""
  emu = gcs_emulator.Emulator(tmp_path_factory.mktemp("gcs"), BUCKET)
  _fs().invalidate_cache()  # listings of another test module's emulator
  local = tmp_path_factory.mktemp("phantom")
  phantom_writers.write_all(local, 0, COUNTS, sizes=(32, 36), slices=(16, 18))
  upload(local, URL)
  yield str(local), URL
  _fs().invalidate_cache()
  emu.stop()


def roots(bucket, dataset):
  local, url = bucket
  sub = phantom_writers.DATASET_DIRS[dataset]
  return os.path.join(local, sub), f"{url}/{sub}"


def as_local(text: str, bucket) -> str:
  """A path or message from the bucket with the bucket's root spelled as the local one."""
  return text.replace(bucket[1], bucket[0])


def listed(dataset, root, partition):
  skips = SkipLog()
  return readers.DATASETS[dataset](root, partition, skips=skips), skips


def assert_same_scan(got, expect):
  """Two Scans of one source: byte-identical arrays, equal geometry, labels and meta."""
  assert got.volume.dtype == expect.volume.dtype == np.float32
  assert got.volume.tobytes() == expect.volume.tobytes()
  assert (got.mask is None) == (expect.mask is None)
  if got.mask is not None:
    assert got.mask.tobytes() == expect.mask.tobytes()
  assert got.spacing == expect.spacing and got.origin == expect.origin
  np.testing.assert_array_equal(got.direction, expect.direction)
  assert got.labels == expect.labels and got.scan_id == expect.scan_id
  assert sorted(got.meta) == sorted(expect.meta)
  for k in got.meta:
    np.testing.assert_array_equal(np.asarray(got.meta[k]), np.asarray(expect.meta[k]))


@pytest.mark.parametrize("dataset", sorted(COUNTS))
def test_readers_list_and_read_the_same_scans_from_a_bucket(bucket, dataset):
  local_root, url_root = roots(bucket, dataset)
  n = 0
  for partition in PARTITIONS[dataset]:
    local, local_skips = listed(dataset, local_root, partition)
    remote, remote_skips = listed(dataset, url_root, partition)
    assert [dataclasses.replace(r, paths=tuple(as_local(p, bucket) for p in r.paths),
                                mask_path=r.mask_path and as_local(r.mask_path, bucket))
            for r in remote] == local
    assert all(p.startswith(f"{url_root}/") for r in remote for p in r.paths)
    assert [dataclasses.replace(e, path=as_local(e.path, bucket), reason=as_local(e.reason, bucket))
            for e in remote_skips.entries] == local_skips.entries
    load_skips = {"local": SkipLog(), "remote": SkipLog()}
    for a, b in zip(remote, local, strict=True):
      got = readers.load_scan(a, skips=load_skips["remote"])
      assert_same_scan(got, readers.load_scan(b, skips=load_skips["local"]))
      assert got.source.startswith(url_root)
      n += 1
    assert [as_local(e.path, bucket) for e in load_skips["remote"].entries] == [
        e.path for e in load_skips["local"].entries]
  assert n == COUNTS[dataset]


def test_preprocessing_from_a_bucket_equals_the_local_records(bucket, tmp_path, capsys):
  refs = {"local": [], "remote": []}
  for dataset in ("cov19ctdb", "lesions", "stoic"):
    local_root, url_root = roots(bucket, dataset)
    refs["local"] += readers.DATASETS[dataset](local_root, "train")[:2]
    refs["remote"] += readers.DATASETS[dataset](url_root, "train")[:2]
  paths = {where: preprocess.build_cache(refs[where], tmp_path / where, SIZES,
                                         workers=2 if where == "remote" else 1, progress=False)
           for where in refs}
  assert len(paths["local"]) == 6
  # The cache key hashes the same bytes: the same file names, and the same records.
  assert [os.path.basename(p) for p in paths["remote"]] == [
      os.path.basename(p) for p in paths["local"]]
  for a, b in zip(paths["remote"], paths["local"], strict=True):
    with open(a, "rb") as fa, open(b, "rb") as fb:
      assert fa.read() == fb.read()
  # A rerun from the bucket finds every record.
  capsys.readouterr()
  assert preprocess.build_cache(refs["remote"], tmp_path / "remote", SIZES, workers=1,
                                progress=False) == paths["remote"]
  assert "6 from the cache" in capsys.readouterr().out


def test_the_preprocessing_command_reads_and_writes_a_bucket(bucket, tmp_path):
  local_root, url_root = roots(bucket, "stoic")
  preprocess.main(["stoic", url_root, str(tmp_path / "out"), "--sizes", "16", "--workers", "1"])
  preprocess.main(["stoic", local_root, f"gs://{BUCKET}/store", "--sizes", "16",
                   "--workers", "1"])
  local = tmp_path / "out" / "stoic"
  records = (".record.json", ".npy")
  names = sorted(n for n in os.listdir(local) if n.endswith(records))
  assert sum(n.endswith(".record.json") for n in names) == COUNTS["stoic"]
  assert (local / "train" / "skips.json").is_file()
  store = storage.as_path(f"gs://{BUCKET}/store/stoic")
  assert sorted(p.name for p in store.iterdir() if p.name.endswith(records)) == names
  for name in names:
    assert (store / name).read_bytes() == (local / name).read_bytes()
  assert (store / "index.csv").read_text() == (local / "index.csv").read_text()


def test_a_record_store_in_a_bucket(bucket, tmp_path, capsys):
  """build_cache into gs://: built once, found by a rerun, read back as the local records."""
  local_root, url_root = roots(bucket, "lesions")
  refs = readers.list_lesions(url_root, "train")
  store = f"gs://{BUCKET}/records/lesions"
  paths = preprocess.build_cache(refs, store, SIZES, workers=2, progress=False)
  assert "3 preprocessed" in capsys.readouterr().out
  assert all(p.startswith(f"{store}/") for p in paths) and len(paths) == COUNTS["lesions"]
  assert preprocess.build_cache(refs, store, SIZES, workers=1, progress=False) == paths
  assert "wrote 0 records and found 3 of its 3" in capsys.readouterr().out
  local = preprocess.build_cache(readers.list_lesions(local_root, "train"), tmp_path, SIZES,
                                 workers=1, progress=False)
  source, expect = pipeline.file_source(paths), pipeline.file_source(local)
  assert source.index == expect.index
  for i in range(len(paths)):
    got, want = source.records[i], expect.records[i]
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_one_scan_named_by_url(bucket, tmp_path):
  """read_path: a slice folder, a volume file and a DICOM series folder in a bucket."""
  local_root, url_root = roots(bucket, "cov19ctdb")
  ref = readers.list_cov19ctdb(local_root, "test")[0]
  folder = os.path.dirname(ref.paths[0])
  assert_same_scan(readers.read_path(as_remote(folder, bucket)), readers.read_path(folder))
  stoic = readers.list_stoic(roots(bucket, "stoic")[0])[0].paths[0]
  assert_same_scan(readers.read_path(as_remote(stoic, bucket)), readers.read_path(stoic))
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  series = tmp_path / "series"
  phantom_writers.write_dicom_series(sitk.ReadImage(stoic, sitk.sitkInt16), series)
  upload(series, f"gs://{BUCKET}/series")
  assert_same_scan(readers.read_path(f"gs://{BUCKET}/series"), readers.read_path(series))
  with pytest.raises(readers.DataError, match=f"gs://{BUCKET}/nothing: no such file"):
    readers.read_path(f"gs://{BUCKET}/nothing")


def as_remote(path: str, bucket) -> str:
  return path.replace(bucket[0], bucket[1])


def test_a_slice_missing_from_the_bucket_is_that_slices_skip(bucket):
  """An object that goes between listing and reading: the slice is skipped, the scan kept."""
  local_root, _ = roots(bucket, "cov19ctdb")
  ref = readers.list_cov19ctdb(local_root, "train")[1]
  folder = f"gs://{BUCKET}/gone/{os.path.basename(os.path.dirname(ref.paths[0]))}"
  for p in ref.paths:
    storage.write_bytes(f"{folder}/{os.path.basename(p)}", open(p, "rb").read())
  scan_ref = readers.ScanRef("cov19ctdb", "x", tuple(f"{folder}/{os.path.basename(p)}"
                                                      for p in ref.paths), {}, "test")
  storage.as_path(scan_ref.paths[3]).unlink()
  skips = SkipLog()
  scan = readers.load_scan(scan_ref, skips=skips)
  assert scan.volume.shape[0] == len(ref.paths) - 1
  assert [(e.what, e.path) for e in skips.entries] == [("slice", scan_ref.paths[3])]
  assert "unreadable image" in skips.entries[0].reason


def test_a_stage_accepts_a_data_root_in_a_bucket(bucket):
  from covid3d import config as config_lib  # pylint: disable=import-outside-toplevel
  from covid3d.stages import inputs  # pylint: disable=import-outside-toplevel
  from covid3d.stages.handoff import HandOffError  # pylint: disable=import-outside-toplevel
  config = config_lib.load("severity:demo")
  config.data.phantom = False
  config.data.cov19ctdb_dir = roots(bucket, "cov19ctdb")[1]
  remote = inputs.list_refs(config, "cov19ctdb", ("train", "validation"))
  config.data.cov19ctdb_dir = roots(bucket, "cov19ctdb")[0]
  local = inputs.list_refs(config, "cov19ctdb", ("train", "validation"))
  assert [r.scan_id for r in remote] == [r.scan_id for r in local] and local
  config.data.cov19ctdb_dir = f"gs://{BUCKET}/no/such/folder"
  with pytest.raises(HandOffError, match="does not exist"):
    inputs.list_refs(config, "cov19ctdb")


def test_records_read_from_a_bucket(bucket, tmp_path):
  """A record store in a bucket: each looked-up array fetched as bytes, equal to the local one."""
  local_root, _ = roots(bucket, "stoic")
  path, = preprocess.build_cache(readers.list_stoic(local_root)[:1], tmp_path / "cache", SIZES,
                                 workers=1, progress=False)
  url = f"gs://{BUCKET}/records/{os.path.basename(path)}"
  upload(tmp_path / "cache", f"gs://{BUCKET}/records")
  local, remote = preprocess.read_record(path), preprocess.read_record(url)
  assert dict(remote.items()).keys() == dict(local.items()).keys()
  for k in local:
    np.testing.assert_array_equal(remote[k], local[k])
  assert remote["volume_16"].dtype == np.float16 and not isinstance(remote["volume_16"], np.memmap)
