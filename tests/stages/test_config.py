"""covid3d.config: the one loader of configs/, ``python -m covid3d.config``, and the data the
chain keeps for the other modules (stages' runners, targets, presets)."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from covid3d import config, report
from covid3d.inference import workdir
from covid3d.stages import chain, handoff, registry

ROOT = Path(__file__).resolve().parents[2]


def test_a_stage_name_and_its_file_load_the_same_config():
  by_name = config.load("severity:authors3,demo")
  assert by_name.to_dict() == config.load(f"{ROOT}/configs/severity.py:authors3,demo").to_dict()
  assert (by_name.model.variant, by_name.init_from, by_name.preset) == (
      "nano", "stage:segmia", "authors3")
  assert config.load("segmia").to_dict() == config.load("segmia:").to_dict()
  assert config.load("segmia").model.variant == "tiny"


def test_a_bad_config_argument_is_one_line():
  with pytest.raises(config.ConfigError, match=r"nothere.py: no such file$"):
    config.load("nothere:demo")
  with pytest.raises(config.ConfigError, match="unknown config argument 'authors1': use one of "
                     "demo .or nothing.$"):
    config.load("segmia:authors1")


def test_demo_is_the_shared_demo_then_the_stages_own():
  c = config.load("pretrain2d:demo")
  assert (c.model.variant, c.train.batch_size, c.train.warmup_steps) == ("nano", 16, 5)
  c = config.load("detection:demo")
  assert (c.train.num_epochs, c.train.num_steps, c.data.phantom) == (0.0, 200, True)


def test_the_cli_prints_what_load_returns():
  run = lambda *args: subprocess.run([sys.executable, "-m", "covid3d.config", *args], cwd=ROOT,
                                     capture_output=True, text=True, check=False)
  out = run("severity:authors3,demo", "--json")
  assert out.returncode == 0 and out.stdout == config.to_json(config.load("severity:authors3,demo"))
  out = run("configs/segmia.py")
  assert out.returncode == 0 and out.stdout == str(config.load("segmia"))
  out = run("severity:nope")
  assert out.returncode == 2 and out.stderr.count("\n") == 1
  assert out.stderr.startswith("python -m covid3d.config: unknown config argument 'nope'")


def test_every_config_file_is_a_stage_the_chain_runs():
  files = {p.stem for p in config.configs_dir().glob("*.py")}
  assert files == set(registry.CONFIGS)
  for name in files:
    stage = chain.stage_of(name)
    assert callable(importlib.import_module(stage.runner).run), name
    assert config.load(name).stage == name


def test_targets_come_from_the_chain():
  assert workdir.target("detection").class_names == ("non-covid", "covid")
  assert workdir.target("severity").label == "severity"
  with pytest.raises(handoff.HandOffError, match="not a fine-tuning stage"):
    workdir.target("segmia")


def test_presets_and_paper_figures_come_from_the_chain():
  rows = chain.paper_rows("severity")
  assert rows[0].name == "table3_random" and len(rows) == 9
  assert report.paper_cv_macro_f1("severity", "authors5") == 71.74
  assert report.paper_cv_macro_f1("detection", "authors2") is None
  assert report.paper_cv_macro_f1("severity", "") is None
  out = subprocess.run([sys.executable, str(ROOT / "covid3d/stages/chain.py"), "--paper-rows",
                        "severity"], capture_output=True, text=True, check=True).stdout
  assert out.splitlines() == [f"{p.name}\t{p.init}" for p in rows]


def test_docs_preset_table_is_the_chains():
  assert chain.presets_markdown() in (ROOT / "docs" / "method.md").read_text(), (
      "docs/method.md's preset table differs from the chain's presets: paste the output of "
      "`python -m covid3d.stages.chain --presets-markdown`")
