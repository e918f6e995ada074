"""A preset's source: a missing one names the command that makes it; one made with another
inflation stops the stage in one line; the presets' inflation is the authors' runs'."""
import json

import pytest

from covid3d import config as base_config
from covid3d.stages import handoff, registry


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


def _workdir(path, stage, init_from, **inflation):
  """A stage workdir as far as the checks before the work read it: its config.json."""
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"stage": stage, "init_from": init_from,
                                                "inflation": inflation}))
  return path


def test_a_source_made_with_another_inflation_stops_the_stage_in_one_line(tmp_path):
  """detection:authors3 needs a 2G segmia, named segmia_2g; one recorded as full stops it."""
  config = base_config.load("detection:authors3")
  assert config.init_from == "stage:segmia_2g" and config.inflation.mode == "2g"
  workdir = tmp_path / "detection_authors3"
  with pytest.raises(handoff.HandOffError, match="make it first with .*--workdir="
                     f"{tmp_path}/segmia_2g .*--config.inflation.mode=2g$"):
    handoff.resolve_siblings(config, workdir)
  source = _workdir(tmp_path / "segmia_2g", "segmia", str(tmp_path / "pretrain2d"),
                    mode="full", norm="sum", gaussian="authors", new_axis=0)
  with pytest.raises(handoff.HandOffError) as err:
    registry.run(config, str(workdir))        # before any data is read or compiled
  assert str(err.value) == (
      f"{source}/config.json records inflation mode=full, but this detection run asks for "
      "mode=2g: start from a workdir made with --config.inflation.mode=2g (launch/ablations.sh "
      "makes them, named <stage>_<mode>), or give --config.inflation.mode=full")
  assert not workdir.exists()
  resolved = handoff.resolve_siblings(config, workdir)
  resolved.inflation.mode = "full"
  handoff.check_inflation(resolved)           # the same inflation: no error
  # new_axis is compared too; norm=sum_per_slice is sum outside 1g.
  resolved.inflation.update(new_axis=2, norm="sum_per_slice")
  with pytest.raises(handoff.HandOffError, match="records inflation new_axis=0, but .* asks for "
                     "new_axis=2: .* or give --config.inflation.new_axis=0$"):
    handoff.check_inflation(resolved)


def test_only_inflated_3d_sources_are_checked(tmp_path):
  config = base_config.load("severity:authors1")        # full, from pretrain2d
  for stage, init in (("pretrain2d", "random"), ("segmentation", "random")):
    config.init_from = str(_workdir(tmp_path / f"{stage}_{init}", stage, init, mode="2g"))
    handoff.check_inflation(config)   # a 2-D source is inflated now; a random one never was
  assert handoff.inflation_settings({"mode": "1g", "norm": "sum_per_slice"}) != \
      handoff.inflation_settings({"mode": "1g", "norm": "sum"})
  assert handoff.inflation_settings({"mode": "full", "gaussian": "centred"}) == \
      handoff.inflation_settings({"mode": "full"})


@pytest.mark.parametrize("preset,mode,new_axis,norm", [
    ("severity:authors1", "full", 2, "sum"), ("severity:table1_ce", "full", 2, "sum"),
    ("severity:table2_1g", "1g", 2, "sum_per_slice"), ("severity:table2_2g", "2g", 2, "sum"),
    ("detection:authors1", "full", 2, "sum"), ("severity:authors3", "full", 0, "sum"),
    ("detection:authors5", "2g", 0, "sum")])
def test_presets_inflate_as_the_authors_runs(preset, mode, new_axis, norm):
  """From ImageNet their code put the 2-D kernel in the (slice, row) plane (new axis 2) and
  rescaled 1G per slice; their 3-D pretrainings (slice-last) inflated in the axial plane."""
  inflation = base_config.load(preset).inflation
  assert (inflation.mode, inflation.new_axis, inflation.norm) == (mode, new_axis, norm)


def test_the_presets_take_the_authors_fold_files_where_they_cross_validate(tmp_path):
  """cv5_cov_nocov.csv-style files go to data.folds_csv; a run without CV refuses one."""
  config = base_config.load("detection:authors3")
  assert config.data.folds == 5
  handoff.check_folds_csv(config)
  config = base_config.load("detection:authors4")
  config.init_from, config.data.folds_csv = "random", str(tmp_path / "cv5_cov_nocov.csv")
  with pytest.raises(handoff.HandOffError, match=r"^data.folds_csv=.*cv5_cov_nocov.csv splits "
                     r"the training scans into folds, but data.folds=1 .*: drop one of the two$"):
    registry.run(config, str(tmp_path / "detection_authors4"))
