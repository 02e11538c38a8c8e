"""Smoke-runs every benchmark module with quick=True through the harness; tests benchlib."""

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


def test_train_scan_matches_a_python_loop_of_sgd_steps():
  import jax.numpy as jnp
  import numpy as np
  import optax
  from gradax.experiments import benchlib

  def loss(w, batch):
    return 0.5 * jnp.sum((batch["x"] @ w - batch["y"]) ** 2)

  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=(4, 3)).astype(np.float32),
              "y": rng.normal(size=4).astype(np.float32)} for _ in range(5)]
  w0 = np.zeros(3, np.float32)
  tx = optax.sgd(0.1)
  (w, _), losses = benchlib.train_scan(loss, tx)(
      w0, tx.init(w0), benchlib.stack_batches(batches))
  w_ref, ref_losses = w0.astype(np.float64), []
  for b in batches:
    residual = b["x"] @ w_ref - b["y"]
    ref_losses.append(0.5 * residual @ residual)
    w_ref = w_ref - 0.1 * b["x"].T @ residual
  np.testing.assert_allclose(w, w_ref, rtol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
