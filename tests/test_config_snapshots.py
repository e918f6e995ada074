"""Each stage's resolved config against its reviewed snapshot (tests/config_snapshots/).

Every config file, with and without ``demo``, and each preset alone and with
``demo``. A change to a config shows up in review as a change of these JSON
files; regenerate them with ``python tests/test_config_snapshots.py``.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = Path(__file__).resolve().parent / "config_snapshots"


def _module(stage):
  spec = importlib.util.spec_from_file_location(f"snapshot_{stage}", ROOT / "configs" / f"{stage}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def specs():
  """``(stage, argument)`` of every snapshot."""
  out = []
  for path in sorted((ROOT / "configs").glob("*.py")):
    presets = sorted(getattr(_module(path.stem), "PRESETS", {}))
    for arg in ["", *presets]:
      out += [(path.stem, arg), (path.stem, f"{arg},demo" if arg else "demo")]
  return out


def snapshot_path(stage, arg):
  return SNAPSHOTS / ".".join([stage, *arg.split(",")]).replace("..", ".").rstrip(".")


def resolved_json(stage, arg):
  config = _module(stage).get_config(arg or None)
  return json.dumps(json.loads(config.to_json_best_effort()), indent=1, sort_keys=True) + "\n"


def write_snapshots():
  for old in SNAPSHOTS.glob("*.json"):
    old.unlink()
  for stage, arg in specs():
    Path(f"{snapshot_path(stage, arg)}.json").write_text(resolved_json(stage, arg))


@pytest.mark.parametrize("stage,arg", specs())
def test_resolved_config_matches_its_snapshot(stage, arg):
  path = Path(f"{snapshot_path(stage, arg)}.json")
  assert path.exists() and resolved_json(stage, arg) == path.read_text(), (
      f"configs/{stage}.py:{arg} differs from {path.name}: if the change is meant, regenerate "
      "the snapshots with `python tests/test_config_snapshots.py` and review their diff")


if __name__ == "__main__":
  write_snapshots()
  sys.exit(0)
