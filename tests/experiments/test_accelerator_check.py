"""Tests for gradax.experiments.accelerator_check (its cheap sections, on CPU)."""

import jax
import numpy as np

from gradax.experiments import accelerator_check as ac


def test_random_spd_has_the_requested_spectrum():
  a, q, w = ac.random_spd(8, 1e3, 0)
  np.testing.assert_allclose(a, a.T, atol=1e-12)
  np.testing.assert_allclose(np.linalg.eigvalsh(a), np.sort(w), rtol=1e-8)
  assert np.isclose(w.max() / w.min(), 1e3)


def test_roots_section_matches_the_float64_closed_form():
  cpu = jax.devices("cpu")[0]
  out = ac.roots(True, cpu, cpu)
  assert set(out) == {f"n32_cond1e+04_{m}_{w}" for m in ("eigh", "newton")
                      for w in ("accelerator", "cpu")}
  for key, r in out.items():
    assert r["ok"], key
    assert r["rel_error_vs_f64"] < 1e-3, (key, r)
  # Same device both times: bit-identical.
  assert out["n32_cond1e+04_newton_accelerator"] == out["n32_cond1e+04_newton_cpu"]


def test_highest_matmul_is_float32_accurate():
  out = ac.matmul_precision(True)
  assert out["highest"] < 1e-5
