"""Smoke-runs every benchmark module with quick=True through the harness."""

import json

import pytest

from gradax.experiments import bench

NAMES = bench.discover()


def test_harness_discovers_benchmarks():
  assert "runner_overhead" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_quick(name, tmp_path):
  result = bench.run_benchmark(name, quick=True, out=str(tmp_path))
  rows = result["rows"]
  assert rows, f"benchmark {name} returned no rows"
  keys = list(rows[0])
  assert all(list(r) == keys for r in rows), "rows must share the same keys"
  assert ("target" in keys) == ("met" in keys), "target and met columns go together"
  saved = json.loads((tmp_path / f"{name}.json").read_text())
  assert saved["rows"] == rows and saved["title"] == result["title"]
  md = (tmp_path / f"{name}.md").read_text()
  assert md.count("\n|") >= len(rows) + 1


def test_unknown_benchmark_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown benchmark 'nope'; valid benchmarks are .*runner_overhead"):
    bench.load("nope")


def test_markdown_table_rejects_ragged_rows():
  with pytest.raises(ValueError, match=r"row 1 has keys \['a'\]; every row must have the keys \['a', 'b'\]"):
    bench.markdown_table([{"a": 1, "b": 2}, {"a": 1}])
  assert bench.markdown_table([{"a": 1.5, "met": True}]).splitlines()[2] == "| 1.5 | yes |"
