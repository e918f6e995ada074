"""The package's shape: no import cycles among covid3d modules, a docstring atop each module,
and a front door (``infer``, ``export``) that does not import the pipeline."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "covid3d"


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, tree: ast.AST) -> set:
  """covid3d modules ``name`` imports anywhere in its body (function-level imports too).

  ``from a.b import c`` counts as importing ``a.b.c`` when that is a module,
  else ``a.b``; importing a module also runs its parent packages' ``__init__``.
  """
  package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      parts = target.split(".")
      found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                   if ".".join(parts[:i]) in MODULES)
  found.discard(name)
  # A package importing its own submodules is not a cycle through the package.
  return {m for m in found if not name.startswith(m + ".")}


def find_cycle(graph: dict):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, path + [nxt])
        if cycle:
          return cycle
    state[node] = "done"
    return None

  for start in sorted(graph):
    if start not in state:
      cycle = visit(start, [start])
      if cycle:
        return cycle
  return None


def test_no_import_cycles():
  graph = {name: imported(name, ast.parse(path.read_text())) for name, path in MODULES.items()}
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_opens_with_a_docstring(name):
  docstring = ast.get_docstring(ast.parse(MODULES[name].read_text()))
  assert docstring and len(docstring.split()) >= 3, (
      f"{MODULES[name]} needs a docstring saying its concern")


FRONT_DOOR = ("covid3d.infer", "covid3d.export")


def test_the_front_door_does_not_import_the_pipeline():
  """``infer`` and ``export`` load no ``covid3d.stages`` module, neither when imported (a
  fresh interpreter's ``sys.modules``) nor in any function (the import graph, function-level
  imports included): what they share with the stages is ``covid3d.inference``."""
  code = (f"import sys, {', '.join(FRONT_DOOR)}\n"
          "print(' '.join(sorted(m for m in sys.modules if m.startswith('covid3d.'))))")
  loaded = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, check=True,
                          capture_output=True, text=True).stdout.split()
  assert "covid3d.inference.ensemble" in loaded
  assert [m for m in loaded if m.startswith("covid3d.stages")] == []
  graph = {name: imported(name, ast.parse(path.read_text())) for name, path in MODULES.items()}
  reached = set().union(*(_reach(graph, m) for m in FRONT_DOOR))
  assert sorted(m for m in reached if m.startswith("covid3d.stages")) == []
  assert "covid3d.stages.predict" in _reach(graph, "covid3d.stages.finetune")  # it can see one


def _reach(graph: dict, start: str) -> set:
  """The modules ``start`` imports, directly or through others."""
  reached, todo = set(), [start]
  while todo:
    name = todo.pop()
    if name not in reached:
      reached.add(name)
      todo += graph[name]
  return reached
