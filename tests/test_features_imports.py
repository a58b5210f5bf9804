"""engine/features is a layer: it imports no app, cli or binary, and its modules form no cycle.

Every import counts, function-local ones too: a local import that only hides a cycle is a cycle.
"""

from __future__ import annotations

import ast
import pathlib

ENGINE = pathlib.Path(__file__).resolve().parents[1] / "engine"
FEATURES = ENGINE / "features"


def _imports(path: pathlib.Path) -> set[str]:
  """Every `engine...` module `path` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from engine.features import model` imports the module engine.features.model.
      found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
  return {m for m in found if m.split(".")[0] == "engine" and _is_module(m)}


def _is_module(name: str) -> bool:
  path = ENGINE.parent.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
  return {f"engine.features.{p.stem}": _imports(p) for p in sorted(FEATURES.glob("*.py"))}


def test_features_imports_no_app_cli_or_binary():
  binaries = {f"engine.{p.stem}" for p in ENGINE.glob("*.py") if p.stem != "__init__"}
  assert "engine.cli" in binaries and "engine.export" in binaries
  upward = {
    mod: sorted(m for m in deps if m in binaries or m.startswith("engine.app"))
    for mod, deps in _graph().items()
  }
  assert not {mod: deps for mod, deps in upward.items() if deps}


def test_features_modules_form_no_cycle():
  graph = {
    mod: {d for d in deps if d.startswith("engine.features.")} for mod, deps in _graph().items()
  }
  assert graph["engine.features.backends"] >= {"engine.features.onnx_export"}
  done, path = set(), []

  def visit(mod):
    if mod in path:
      raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(mod) :], mod])}")
    if mod in done:
      return
    path.append(mod)
    for dep in sorted(graph.get(mod, ())):
      visit(dep)
    path.pop()
    done.add(mod)

  for mod in graph:
    visit(mod)
