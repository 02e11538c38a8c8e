"""Benchmark harness: ``python -m gradax.experiments.bench NAME|all [--quick] [--out results]``.

Like the test suite, the harness gives JAX 8 CPU devices (``--cpu_devices``).

A benchmark is a module ``experiments/benchmarks/<name>.py`` defining
``TITLE: str`` and ``run(quick: bool = False) -> list[dict]``. It measures
things side by side in one run (use ``gradax.experiments.benchlib.median_time``)
and returns table rows: dicts with identical keys, including ``target`` and
``met`` columns where a target exists. The harness writes ``<out>/<name>.json``
(title, rows, environment) and ``<out>/<name>.md`` (a markdown table) and
prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

BENCHMARK_PACKAGE = "gradax.experiments.benchmarks"


def discover() -> list[str]:
  """Names of all benchmark modules (``experiments/benchmarks/*.py``), sorted."""
  pkg = importlib.import_module(BENCHMARK_PACKAGE)
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                if not m.name.startswith("_"))


def load(name: str):
  """Imports benchmark ``name``; checks it defines ``TITLE`` and ``run``."""
  names = discover()
  if name not in names:
    raise ValueError(
        f"unknown benchmark {name!r}; valid benchmarks are {', '.join(names) or '(none)'}.")
  module = importlib.import_module(f"{BENCHMARK_PACKAGE}.{name}")
  if not isinstance(getattr(module, "TITLE", None), str) or not callable(getattr(module, "run", None)):
    raise ValueError(
        f"benchmark module {name!r} must define TITLE (a str) and run(quick=False).")
  return module


def _fmt(value: Any) -> str:
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    if value == 0 or 1e-3 <= abs(value) < 1e6:
      return f"{value:.4g}"
    return f"{value:.3e}"
  return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
  """Renders rows (dicts with identical keys) as a markdown table."""
  if not rows:
    return "(no rows)\n"
  keys = list(rows[0])
  for i, row in enumerate(rows):
    if list(row) != keys:
      raise ValueError(
          f"benchmark row {i} has keys {list(row)}; every row must have the keys {keys}.")
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_fmt(row[k]) for k in keys) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  if hasattr(value, "item"):
    return value.item()
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return str(value)


def run_benchmark(name: str, quick: bool = False, out: str | None = "results") -> dict:
  """Runs one benchmark; writes ``out/name.json`` and ``out/name.md`` unless ``out`` is None."""
  module = load(name)
  start = time.perf_counter()
  rows = [_jsonable(dict(r)) for r in module.run(quick=quick)]
  elapsed = time.perf_counter() - start
  table = markdown_table(rows)
  import jax  # pylint: disable=g-import-not-at-top
  result = {
      "name": name,
      "title": module.TITLE,
      "quick": quick,
      "rows": rows,
      "seconds": elapsed,
      "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "env": {"python": platform.python_version(), "jax": jax.__version__,
              "backend": jax.default_backend(), "devices": jax.device_count(),
              "cpus": os.cpu_count()},
  }
  if out is not None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
      f.write(f"# {module.TITLE}\n\n{table}\n"
              f"_{result['utc']}, {result['env']['backend']} x{result['env']['devices']}, "
              f"{elapsed:.1f} s{', quick' if quick else ''}_\n")
  return result


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m gradax.experiments.bench",
      description="Run gradax benchmarks and write results/NAME.json and results/NAME.md.")
  parser.add_argument("name", help="a benchmark name, or 'all'")
  parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds each")
  parser.add_argument("--out", default="results", help="output folder (default: results)")
  parser.add_argument("--cpu_devices", type=int, default=8,
                      help="CPU devices JAX creates (as in the tests; 0 = JAX's default)")
  args = parser.parse_args(argv)
  if args.cpu_devices:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  try:
    names = discover() if args.name == "all" else [load(args.name) and args.name]
  except ValueError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    return 2
  failed = []
  for name in names:
    try:
      result = run_benchmark(name, quick=args.quick, out=args.out)
    except Exception as e:  # pylint: disable=broad-except
      # One broken benchmark must not hide the others' results.
      print(f"bench: {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
      failed.append(name)
      continue
    print(f"## {result['title']} ({name}, {result['seconds']:.1f} s)\n")
    print(markdown_table(result["rows"]))
  if failed:
    print(f"bench: {len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
