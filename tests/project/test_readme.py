"""The README: its notebook example runs as printed, its commands are CI's, it stays a front
page, and every relative link and anchor in it and in docs/ resolves."""
import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


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


def test_readme_is_a_front_page():
  lines = len(README.read_text().splitlines())
  assert lines <= 180, f"README.md has {lines} lines: move details to docs/"


def prose(text: str) -> str:
  """``text`` without its fenced code blocks (their ``#`` lines are not headings)."""
  return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def anchors(path: Path) -> set:
  """GitHub's anchors of the headings of a markdown file."""
  found, seen = set(), {}
  for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", prose(path.read_text()), flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    found.add(slug if count == 0 else f"{slug}-{count}")
  return found


def test_anchors_follow_github():
  page = REPO / "docs" / "method.md"
  assert "presets-each-submission-and-ablation-row-as-one-command" in anchors(page)
  assert "2-d-to-3-d-inflation" in anchors(page)


def test_relative_links_and_anchors_resolve():
  broken = []
  for page in PAGES:
    for target in LINK.findall(prose(page.read_text())):
      if re.match(r"[a-z]+:", target):
        continue  # a web address
      path, _, anchor = target.partition("#")
      resolved = (page.parent / path).resolve() if path else page
      where = f"{page.relative_to(REPO)}: {target}"
      if not resolved.is_relative_to(REPO):
        broken.append(f"{where} (outside the repository)")
      elif not resolved.exists():
        broken.append(f"{where} (no such file)")
      elif anchor and anchor not in anchors(resolved):
        broken.append(f"{where} (no such heading)")
  assert not broken, "\n".join(broken)
