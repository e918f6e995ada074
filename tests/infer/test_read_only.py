"""The model is read-only to ``infer`` and ``export``: no file in a model workdir, a
``--lesions`` workdir or an exported file is created or changed by reading it."""
import os

import pytest

from train_helpers import folder_state, read_only_copy

pytestmark = pytest.mark.slow   # the chain


def test_infer_and_export_read_a_read_only_model_and_write_nothing_there(chain, tmp_path):
  """On read-only copies of the chain's severity and segmentation workdirs (chmod -R a-w;
  as root, where that stops no writer, the state of every file before and after shows any
  write): export, then infer with --lesions and --saliency from the workdir, and infer from
  the read-only exported file."""
  from covid3d import export, infer
  models = tmp_path / "models"
  models.mkdir()
  before = {name: read_only_copy(chain / name, models / name)
            for name in ("severity", "segmentation")}
  exported = tmp_path / "exported" / "severity.covid3d"
  exported.parent.mkdir()
  assert export.main([f"--model={models / 'severity'}", f"--out={exported}"]) == 0
  os.chmod(exported, 0o444)
  os.chmod(exported.parent, 0o555)
  before["exported"] = folder_state(exported.parent)
  scan = sorted((chain / "data" / "stoic" / "data" / "mha").glob("*.mha"))[0]
  assert infer.main([f"--model={models / 'severity'}", f"--lesions={models / 'segmentation'}",
                     "--saliency", f"--out={tmp_path / 'out'}", str(scan)]) == 0
  assert infer.main([f"--model={exported}", f"--out={tmp_path / 'out_exported'}",
                     str(scan)]) == 0
  assert (tmp_path / "out" / "predictions.csv").exists()
  after = {name: folder_state(models / name) for name in ("severity", "segmentation")}
  after["exported"] = folder_state(exported.parent)
  for name, state in before.items():
    assert sorted(set(after[name]) - set(state)) == [], f"{name}: files created"
    assert sorted(k for k in state if after[name].get(k) != state[k]) == [], \
        f"{name}: files changed or removed"
