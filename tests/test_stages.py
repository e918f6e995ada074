"""The pipeline end to end on a small phantom (one or two steps per stage), and bad hand-offs."""
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from covid3d.stages import registry
from covid3d.stages.handoff import HandOffError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load_config(name, arg="demo"):
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("chain")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Identical step programs of different stages compile once."""
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  yield
  jax.config.update("jax_compilation_cache_dir", old)


def tiny(name, root, **overrides):
  c = load_config(name)
  c.data.phantom_dir = str(root / "data")
  c.data.phantom_scans = 8
  c.data.folds = 2
  c.data.workers = 1
  c.train.num_steps = 2
  c.train.warmup_steps = 0
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.train.batch_size = 2
  c.train.eval_batch_size = 4
  c.train.progress_bar = False
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def run(name, root, workdir, **overrides):
  registry.run(tiny(name, root, **overrides), str(root / workdir))
  return root / workdir


@pytest.fixture(scope="module")
def chain(root):
  """pretrain2d -> segmentation -> pseudolabel -> segmia, multitask -> severity (2 folds)."""
  run("pretrain2d", root, "pretrain2d")
  run("segmentation", root, "segmentation", init_from=str(root / "pretrain2d"))
  run("pseudolabel", root, "pseudolabel", init_from=str(root / "segmentation"))
  run("segmia", root, "segmia", init_from=str(root / "pretrain2d"),
      pseudo_labels=str(root / "pseudolabel"))
  run("multitask", root, "multitask", init_from=str(root / "pretrain2d"),
      pseudo_labels=str(root / "pseudolabel"))
  run("severity", root, "severity", init_from=str(root / "multitask"))
  return root


def test_chain_writes_every_output(chain):
  for stage in ("pretrain2d", "segmentation", "pseudolabel", "segmia", "multitask", "severity"):
    assert (chain / stage / "DONE").exists(), stage
    assert (chain / stage / "config.json").exists(), stage
  cv = json.loads((chain / "severity" / "cv.json").read_text())
  assert len(cv["folds"]) == 2 and 0.0 <= cv["mean_macro_f1"] <= 1.0
  rows = (chain / "severity" / "predictions_validation.csv").read_text().splitlines()
  assert rows[0].startswith("scan,p_mild,p_moderate,p_severe,p_critical,class")
  probs = np.array([[float(x) for x in r.split(",")[1:5]] for r in rows[1:]])
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
  metrics = json.loads((chain / "severity" / "metrics_validation.json").read_text())
  assert np.sum(metrics["confusion_matrix"]) == metrics["n"] > 0
  assert (chain / "severity" / "confusion_validation.png").stat().st_size > 1000
  files = [(chain / "severity" / "submission_test" / f"{c}.csv").read_text().splitlines()
           for c in ("mild", "moderate", "severe", "critical")]
  assert all(lines[0] == "patient" for lines in files)        # the authors' submission format
  submitted = sum(len(lines) - 1 for lines in files)
  assert submitted == len((chain / "severity" / "predictions_test.csv").read_text().splitlines()) - 1


def test_pseudo_labels_keep_the_scan_geometry(chain):
  masks = sorted((chain / "pseudolabel" / "masks" / "stoic").glob("*.npz"))
  assert masks and set(np.load(masks[0]).files) == {"mask_40", "mask_32"}
  niftis = sorted((chain / "pseudolabel" / "nifti" / "stoic").glob("*_pseudo.nii.gz"))
  assert len(niftis) == len(masks)
  import SimpleITK as sitk
  partition, stem = niftis[0].name[:-len("_pseudo.nii.gz")].split("__", 1)   # train__<scan id>
  assert partition == "train"
  original = sitk.ReadImage(str(chain / "data" / "stoic" / "data" / "mha" / f"{stem}.mha"))
  written = nib.load(str(niftis[0]))
  assert written.shape == original.GetSize()
  np.testing.assert_allclose(nib.affines.voxel_sizes(written.affine), original.GetSpacing(), rtol=1e-5)


def test_finished_folds_are_skipped_on_rerun(chain, caplog):
  before = (chain / "severity" / "fold0" / "metrics.jsonl").read_text()
  with caplog.at_level("INFO"):
    run("severity", chain, "severity", init_from=str(chain / "multitask"))
  assert "fold 0 already finished" in caplog.text
  assert (chain / "severity" / "fold0" / "metrics.jsonl").read_text() == before


def test_missing_checkpoint_names_the_producing_command(root, tmp_path):
  with pytest.raises(HandOffError, match="run that stage first"):
    run("segmentation", root, "seg_bad", init_from=str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(HandOffError, match="holds no finished checkpoint"):
    run("segmentation", root, "seg_bad", init_from=str(tmp_path))
  with pytest.raises(HandOffError, match="neither 'random', a workdir nor a checkpoint"):
    run("segmentation", root, "seg_bad", init_from=str(tmp_path / "nothing"))
  with pytest.raises(HandOffError, match="pseudolabel stage"):
    run("segmia", root, "segmia_bad", pseudo_labels=str(tmp_path))
  with pytest.raises(HandOffError, match="config.data.cov19ctdb_dir"):
    run("severity", root, "sev_bad", **{"data.phantom": False, "data.cov19ctdb_dir": str(tmp_path / "x")})


def test_wrong_variant_is_a_clear_error(chain):
  with pytest.raises(HandOffError, match="variant") as err:
    run("segmentation", chain, "seg_variant", init_from=str(chain / "pretrain2d"),
        **{"model.variant": "tiny"})
  assert "stage0/block2" in str(err.value) or "shape" in str(err.value)


def test_wrong_number_of_classes_is_a_clear_error(chain, tmp_path):
  # A severity workdir (4-class folds) that says it ran the detection stage (2 classes).
  relabelled = tmp_path / "severity_as_detection"
  shutil.copytree(chain / "severity", relabelled)
  config = json.loads((relabelled / "config.json").read_text())
  (relabelled / "config.json").write_text(json.dumps(dict(config, stage="detection")))
  with pytest.raises(HandOffError, match=r"detection, 2 classes"):
    run("predict", chain, "predict_bad", init_from=str(relabelled))
