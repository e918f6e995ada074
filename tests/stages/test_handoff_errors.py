"""A stage handed a wrong source stops with one line that says what to run or check."""
import json
import shutil

import jax
import pytest

from covid3d.models import VARIANTS
from covid3d.inference import build
from covid3d.stages import initial_params
from covid3d.stages.handoff import HandOffError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]  # the chain


def test_missing_checkpoint_names_the_producing_command(chain, run_stage, tmp_path):
  root = chain
  with pytest.raises(HandOffError, match="run that stage first"):
    run_stage("segmentation", root, "seg_bad", init_from=str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(HandOffError, match="holds no finished checkpoint"):
    run_stage("segmentation", root, "seg_bad", init_from=str(tmp_path))
  with pytest.raises(HandOffError, match="a finished pseudolabel workdir, and that stage writes "
                                         "no checkpoints"):
    run_stage("segmentation", root, "seg_bad", init_from=str(root / "pseudolabel"))
  with pytest.raises(HandOffError, match="neither 'random', a workdir nor a checkpoint"):
    run_stage("segmentation", root, "seg_bad", init_from=str(tmp_path / "nothing"))
  with pytest.raises(HandOffError, match="pseudolabel stage"):
    run_stage("segmia", root, "segmia_bad", pseudo_labels=str(tmp_path))
  with pytest.raises(HandOffError, match="multitask trains on pseudo-labels: give "
                                         "--config.pseudo_labels="):
    run_stage("multitask", root, "multitask_bad")
  with pytest.raises(HandOffError, match="config.data.cov19ctdb_dir"):
    run_stage("severity", root, "sev_bad",
        **{"data.phantom": False, "data.cov19ctdb_dir": str(tmp_path / "x")})


def test_wrong_variant_is_a_clear_error(chain, shrink):
  config = shrink("segmentation", chain, init_from=str(chain / "pretrain2d"),
                **{"model.variant": "tiny"})
  model = build.make_model(config, {}, segmentation=True)
  like = jax.eval_shape(lambda: build.init_params(model, config, min(config.data.sizes)))
  with pytest.raises(HandOffError, match="variant") as err:
    initial_params.load_initial_params(config, like)
  # One message naming what does not fit: the source, its missing blocks and
  # mis-shaped leaves (nano weights in a tiny model), and the variant to check.
  lines = str(err.value).splitlines()
  source = str(chain / "pretrain2d")
  assert lines[0] == f"backbone weights of {source} do not match the model:"
  nano, tiny_ = VARIANTS["nano"], VARIANTS["tiny"]
  assert "  missing: stage0/block2/dwconv/kernel" in lines          # tiny: 3 blocks, nano: 2
  assert (f"  shape: stem/conv/kernel: (4, 4, 4, 1, {nano[1][0]}) vs expected "
          f"(4, 4, 4, 1, {tiny_[1][0]})") in lines
  assert not [l for l in lines if l.startswith("  unexpected:")]
  assert lines[-1] == (f"(is config.model.variant='tiny' the variant {source} was trained "
                       "with?)")


def test_wrong_number_of_classes_is_a_clear_error(chain, run_stage, tmp_path):
  # A severity workdir (4-class folds) that says it ran the detection stage (2 classes).
  relabelled = tmp_path / "severity_as_detection"
  shutil.copytree(chain / "severity", relabelled)
  config = json.loads((relabelled / "config.json").read_text())
  (relabelled / "config.json").write_text(json.dumps(dict(config, stage="detection")))
  with pytest.raises(HandOffError, match=r"detection, 2 classes"):
    run_stage("predict", chain, "predict_bad", init_from=str(relabelled))


# --- what the stages hand on ------------------------------------------------
