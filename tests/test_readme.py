"""The README's notebook example runs as printed."""
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_notebook_example_runs():
  text = README.read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "the README lost its python example"
  scope = {}
  exec(compile(blocks[0], "README example", "exec"), scope)  # pylint: disable=exec-used
  assert scope["logits"].shape == (2, 4)
  assert np.isfinite(float(scope["loss"]))
  assert scope["aug"].shape == (2, 32, 32, 32)


def test_readme_commands_match_ci():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  command = 'pip install -e ".[test]" && ruff check . && python -m pytest -q tests'
  assert command in text and command in ci
  assert "bash launch/demo.sh" in text
