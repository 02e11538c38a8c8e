"""Packaging: pyproject lists every subpackage, and they import as gradax.*."""

import importlib
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXCLUDED = {"tests", "colabs", ".venv", "build", "dist", "results", "runs"}


def _package_folders():
  found = {"gradax"}
  for init in ROOT.rglob("__init__.py"):
    rel = init.parent.relative_to(ROOT)
    if rel.parts and (rel.parts[0] in EXCLUDED or rel.parts[0].startswith(".")
                      or any(p.endswith(".egg-info") or p == "__pycache__" for p in rel.parts)):
      continue
    found.add(".".join(("gradax",) + rel.parts))
  return found


def test_pyproject_lists_every_subpackage():
  conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
  setuptools = conf["tool"]["setuptools"]
  assert setuptools["package-dir"] == {"gradax": "."}
  listed = set(setuptools["packages"])
  missing = sorted(_package_folders() - listed)
  assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"
  stale = sorted(listed - _package_folders())
  assert not stale, f"pyproject lists packages that have no __init__.py: {stale}"


def test_subpackages_import():
  for name in sorted(_package_folders()):
    importlib.import_module(name)


def test_dependencies_and_test_extra():
  conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  deps = " ".join(conf["dependencies"])
  for name in ("jax", "flax", "optax", "chex", "orbax-checkpoint", "absl-py", "numpy"):
    assert name in deps
  assert conf["requires-python"] == ">=3.11"
  test_extra = " ".join(conf["optional-dependencies"]["test"])
  assert "pytest" in test_extra and "pytest-xdist" in test_extra
