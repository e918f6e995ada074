"""Each stage's resolved config against its reviewed snapshot (tests/stages/config_snapshots/).

Every config file, with and without ``demo``, and each preset alone and with
``demo``. A change to a config shows up in review as a change of these JSON
files; regenerate them with ``python tests/stages/test_config_snapshots.py`` and
review the diff.
"""
import sys
from pathlib import Path

import pytest

from covid3d import config
from covid3d.stages import chain

SNAPSHOTS = Path(__file__).resolve().parent / "config_snapshots"
REGENERATE = "regenerate the snapshots with `python tests/stages/test_config_snapshots.py`"


def specs() -> list[str]:
  """``STAGE[:ARG]`` of each snapshot: every config file and preset, with and without demo."""
  out = []
  for path in sorted(config.configs_dir().glob("*.py")):
    presets = chain.target(path.stem).presets if path.stem in chain.TARGETS else ()
    for preset in ["", *sorted(p.name for p in presets)]:
      out += [f"{path.stem}:{preset}", f"{path.stem}:{preset + ',' if preset else ''}demo"]
  return out


def snapshot(spec: str) -> Path:
  """``severity:authors3,demo`` -> config_snapshots/severity.authors3.demo.json."""
  return SNAPSHOTS / (".".join(w for w in spec.replace(":", ",").split(",") if w) + ".json")


def write_snapshots():
  for old in SNAPSHOTS.glob("*.json"):
    old.unlink()
  for spec in specs():
    snapshot(spec).write_text(config.to_json(config.load(spec)))


@pytest.mark.parametrize("spec", specs())
def test_resolved_config_matches_its_snapshot(spec):
  path = snapshot(spec)
  assert path.exists() and config.to_json(config.load(spec)) == path.read_text(), (
      f"{spec} differs from tests/stages/config_snapshots/{path.name}: if the change is meant, "
      f"{REGENERATE} and review the diff")


def test_every_snapshot_is_of_a_config():
  assert sorted(SNAPSHOTS.glob("*.json")) == sorted(map(snapshot, specs())), (
      f"tests/stages/config_snapshots/ holds other configs than these: {REGENERATE}")


if __name__ == "__main__":
  write_snapshots()
  sys.exit(0)
