"""A preset whose source stage has not run names the command that makes it."""
import pytest

from covid3d import config as base_config
from covid3d.stages import handoff


def test_a_missing_source_stage_names_the_command_that_makes_it(tmp_path):
  config = base_config.load("severity:authors3")   # starts from stage:segmia
  workdir = tmp_path / "ablation_authors3"
  with pytest.raises(handoff.HandOffError) as err:
    handoff.resolve_siblings(config, workdir)
  assert str(err.value) == (
      f"init_from='stage:segmia' names {tmp_path}/segmia, which does not exist: make it first "
      f"with python -m covid3d.main --config=configs/segmia.py --workdir={tmp_path}/segmia "
      f"--config.init_from={tmp_path}/pretrain2d --config.pseudo_labels={tmp_path}/pseudolabel "
      "--config.inflation.mode=full")
  (tmp_path / "segmia").mkdir()
  assert handoff.resolve_siblings(config, workdir).init_from == str(tmp_path / "segmia")
  config.init_from = "stage:nope"
  with pytest.raises(handoff.HandOffError, match="nope is not a stage of the chain"):
    handoff.resolve_siblings(config, workdir)
