"""privacy/ is a library of its own: it imports no fedsim module and has no import cycles.

The command-line entry points may read a run (its config, checkpoint and data) through fedsim,
so they are left out: compute_epsilon (--config mode) and the encrypted-inference service.
"""

import ast
import graphlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "privacy"
ENTRY_POINTS = {"privacy.compute_epsilon", "privacy.encrypted_inference.service",
                "privacy.encrypted_inference.__main__"}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
LIBRARY = sorted(set(SOURCES) - ENTRY_POINTS - {"privacy"})


def _imported(path: pathlib.Path) -> set[str]:
  """Every module named by an import anywhere in the file (also inside functions)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)


def test_the_library_modules_are_found():
  assert {"privacy.validation", "privacy.events", "privacy.accountants", "privacy.ledger",
          "privacy.clipping", "privacy.ghost"} <= set(LIBRARY)


def test_importing_every_library_module_loads_no_fedsim():
  code = f"""
import importlib, sys
for name in {LIBRARY!r}:
  importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith("fedsim"))
assert not loaded, loaded
from privacy import ghost_layers
assert not ghost_layers.conv_layers(), ghost_layers.conv_layers()  # fedsim registers its own
print("ok")
"""
  out = _run(code)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_each_library_module_imports_alone():
  """Each module from a state with no privacy module loaded (third-party ones stay loaded)."""
  code = f"""
import importlib, sys
for name in {LIBRARY!r}:
  for loaded in [m for m in sys.modules if m == "privacy" or m.startswith("privacy.")]:
    del sys.modules[loaded]
  importlib.import_module(name)
  assert not [m for m in sys.modules if m.startswith("fedsim")], name
print("ok")
"""
  out = _run(code)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("name", LIBRARY)
def test_no_fedsim_import_anywhere_in_the_source(name):
  """Also lazy imports inside functions, which importing the module would not reveal."""
  fedsim = [m for m in _imported(SOURCES[name]) if m == "fedsim" or m.startswith("fedsim.")]
  assert not fedsim, f"{name} imports {fedsim}"


def test_no_import_cycles_within_privacy():
  graph = {name: {m for m in _imported(path) if m in SOURCES and m not in ("privacy", name)}
           for name, path in SOURCES.items()}
  order = list(graphlib.TopologicalSorter(graph).static_order())  # Raises CycleError.
  assert set(order) == set(SOURCES)
