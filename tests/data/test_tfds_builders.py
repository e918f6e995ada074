"""Tests for covid3d.data.tfds_builders: builds from phantom data, no TF."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from covid3d.data import phantom_writers
from covid3d.data import pipeline
from covid3d.data import preprocess
from covid3d.data import readers
from covid3d.data import schema
from covid3d.data import tfds_builders
from covid3d.data.skips import DataError
from covid3d.data.tfds_builders import base
from covid3d.data.tfds_builders.phantom import PhantomConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = (32, 16)
TINY = PhantomConfig(name="tiny", sizes=SIZES, scans_per_dataset=2)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  """The three phantom datasets, small, as a manual dir."""
  root = tmp_path_factory.mktemp("manual")
  phantom_writers.write_all(str(root), 1, 5, sizes=(32, 40), slices=(16, 20))
  return root


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
  """One download dir for all builds, so the preprocessing cache is shared."""
  return str(tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="module")
def phantom_dir(raw, downloads, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("data"))
  tfds_builders.build("phantom", data_dir=data_dir, manual_dir=str(raw),
                      download_dir=downloads, config=TINY, workers=1)
  return data_dir


def expected_splits(raw):
  """{'<dataset>_<partition>': sorted scan ids}, partitions from the phantom's
  manifest, scan ids from the readers."""
  manifest = json.loads((raw / phantom_writers.MANIFEST).read_text())
  out = {}
  for name in phantom_writers.DATASETS:
    root = raw / phantom_writers.DATASET_DIRS[name]
    for partition in {s.get("partition", "train")
                      for s in manifest["scans"][name]}:
      refs = readers.DATASETS[name](root, partition)
      out[f"{name}_{partition}"] = sorted(r.scan_id for r in refs)
  return out


def test_phantom_splits_and_index(raw, phantom_dir):
  builder = tfds.builder("phantom/tiny", data_dir=phantom_dir)
  expect = expected_splits(raw)
  assert set(builder.info.splits) == set(expect)
  assert {"cov19ctdb_train", "cov19ctdb_validation", "cov19ctdb_test",
          "lesions_train", "stoic_train"} <= set(expect)
  for split, ids in expect.items():
    source = pipeline.tfds_source("phantom/tiny", split, phantom_dir)
    assert [e["scan_id"] for e in source.index] == ids
    for i, entry in enumerate(source.index):
      record = source.records[i]
      assert dict(schema.index_entry(record), partition=split) == entry
      assert record["volume_32"].dtype == np.float16
      assert record["volume_16"].shape == (16, 16, 16)
      assert record["mask_32"].dtype == np.uint8


def test_records_equal_preprocessed_scans(raw, phantom_dir):
  """Each dataset's first record is preprocess_scan of the scan read by the
  readers, field for field."""
  for name in phantom_writers.DATASETS:
    root = raw / phantom_writers.DATASET_DIRS[name]
    ref = min(readers.DATASETS[name](root, "train"), key=lambda r: r.scan_id)
    want = preprocess.preprocess_scan(readers.load_scan(ref), SIZES)
    got = pipeline.tfds_source("phantom/tiny", f"{name}_train",
                               phantom_dir).records[0]
    assert schema.scan_id(got) == ref.scan_id
    for k in schema.field_names(SIZES)[1:]:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]),
                                    err_msg=f"{name} {k}")
  stoic = pipeline.tfds_source("phantom/tiny", "stoic_train", phantom_dir)
  assert {e["stoic_severe"] for e in stoic.index} <= {0, 1}
  lesions = pipeline.tfds_source("phantom/tiny", "lesions_train", phantom_dir)
  assert all(e["has_mask"] == 1 for e in lesions.index)


def test_pipeline_over_the_built_dataset(phantom_dir):
  source = pipeline.tfds_source("phantom/tiny", "cov19ctdb_train",
                                phantom_dir)
  indices = pipeline.select_records(source, label="covid")
  assert len(indices) == len(source.index)
  ds = pipeline.host_dataset(source, indices, global_batch_size=2,
                             fields={"image": "volume_16", "label": "covid"},
                             train=False)
  seen = []
  for batch in ds:
    assert batch["image"].shape == (2, 16, 16, 16, 1)
    assert batch["image"].dtype == np.float32
    for row in np.flatnonzero(batch["valid"]):
      i = batch["record_index"][row]
      np.testing.assert_array_equal(
          batch["image"][row, ..., 0],
          source.records[i]["volume_16"].astype(np.float32))
      assert batch["label"][row] == source.index[i]["covid"]
      seen.append(int(i))
  assert seen == list(range(len(source.index)))


@pytest.mark.parametrize("name", ["cov19ctdb", "lesions", "stoic"])
def test_real_format_builders(name, raw, downloads, tmp_path):
  root = raw / phantom_writers.DATASET_DIRS[name]
  builder = tfds_builders.build(name, data_dir=str(tmp_path),
                                manual_dir=str(root), download_dir=downloads,
                                config=base.ScanConfig(name="tiny",
                                                       sizes=SIZES),
                                workers=1)
  expect = {k.split("_", 1)[1]: v
            for k, v in expected_splits(raw).items()
            if k.startswith(name + "_")}
  assert set(builder.info.splits) == set(expect)
  for split, ids in expect.items():
    source = pipeline.tfds_source(f"{name}/tiny", split, str(tmp_path))
    assert [e["scan_id"] for e in source.index] == ids


def test_cli_builds_demo_config(raw, downloads, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "covid3d.data.tfds_builders", "build", "stoic",
       "--config", "demo", "--manual_dir", str(raw / "stoic"),
       "--data_dir", str(tmp_path), "--download_dir", downloads,
       "--workers", "1"], capture_output=True, text=True, cwd=REPO,
      timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stoic/demo" in out.stdout
  source = pipeline.tfds_source("stoic/demo", "train", str(tmp_path))
  assert source.records[0]["volume_64"].shape == (64, 64, 64)
  assert len(source.index) == 5


def test_tfds_build_command_code_path(raw, downloads, tmp_path):
  """`tfds build covid3d/data/tfds_builders/phantom ...` as the tfds command
  runs it (its `build` subcommand; the `tfds` entry point itself imports
  TensorFlow, which is not installed), in a process of its own: its parser
  takes every absl flag of the process, and covid3d.main's would clash."""
  pytest.importorskip("tensorflow_datasets.scripts.cli.build")
  module_dir = os.path.join(REPO, "covid3d", "data", "tfds_builders", "phantom")
  script = (
      "import sys\n"
      "from tensorflow_datasets.scripts.cli import build, cli_utils\n"
      "cli_utils.make_flags_parser(build.Args, 'tfds build')(sys.argv).execute()\n")
  out = subprocess.run(
      [sys.executable, "-c", script, module_dir, "--config", "demo", "--manual_dir", str(raw),
       "--data_dir", str(tmp_path), "--download_dir", downloads],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  builder = tfds.builder("phantom/demo", data_dir=str(tmp_path))
  assert builder.info.splits["stoic_train"].num_examples == 5
  assert builder.info.file_format.value == "array_record"


def test_phantom_generated_into_empty_manual_dir(tmp_path):
  downloads = tmp_path / "dl"
  builder = tfds_builders.build("phantom", data_dir=str(tmp_path / "data"),
                                download_dir=str(downloads), config=TINY,
                                workers=1)
  manifest = json.loads((downloads / "manual" /
                         phantom_writers.MANIFEST).read_text())
  assert manifest["seed"] == TINY.seed
  assert builder.info.splits["stoic_train"].num_examples == 2
  assert builder.info.splits["lesions_train"].num_examples == 2


def test_bad_scan_skipped_or_strict(raw, downloads, tmp_path):
  root = tmp_path / "stoic"
  shutil.copytree(raw / "stoic", root)
  bad = sorted((root / "data" / "mha").iterdir())[1]
  bad.write_bytes(bad.read_bytes()[:200])  # truncated MHA
  config = base.ScanConfig(name="tiny", sizes=SIZES)
  with pytest.raises(DataError, match=bad.name):
    tfds_builders.build("stoic", data_dir=str(tmp_path / "strict"),
                        manual_dir=str(root), download_dir=downloads,
                        config=config, workers=1, strict=True)
  builder = tfds_builders.build("stoic", data_dir=str(tmp_path / "data"),
                                manual_dir=str(root), download_dir=downloads,
                                config=config, workers=1)
  assert builder.info.splits["train"].num_examples == 4
  skips = json.loads(open(os.path.join(downloads, base.CACHE_SUBDIR,
                                       "skips.json")).read())
  assert any(bad.name in s["path"] for s in skips["skips"])


def test_missing_manual_dir_and_bad_format(tmp_path):
  with pytest.raises(AssertionError, match="train/covid/ct_scan_N"):
    tfds_builders.build("cov19ctdb", data_dir=str(tmp_path),
                        manual_dir=str(tmp_path / "nothing"), config="demo")
  with pytest.raises(ValueError, match="array_record only"):
    tfds_builders.builder_class("stoic")(data_dir=str(tmp_path),
                                         file_format="tfrecord")
  with pytest.raises(ValueError, match="unknown dataset"):
    tfds_builders.builder_class("imagenet")
