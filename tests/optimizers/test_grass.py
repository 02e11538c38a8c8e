"""Grass against a NumPy reference; unbiasedness of norm sampling."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import optimizers as gx

grass_mod = importlib.import_module("gradax.optimizers.grass")
B1, B2, EPS = 0.9, 0.99, 1e-8


def _reference_two_steps(g1, g2, rank):
  """NumPy Grass (top-norm, no refresh in between): rows are the shorter side."""
  tall = g1.shape[0] > g1.shape[1]
  a1, a2 = (g1.T, g2.T) if tall else (g1, g2)
  rows = np.argsort(-np.sum(a1 ** 2, axis=1))[:rank]
  m = B1 * (1 - B1) * a1[rows] + (1 - B1) * a2[rows]
  v = B2 * (1 - B2) * a1[rows] ** 2 + (1 - B2) * a2[rows] ** 2
  want = np.zeros_like(a1, dtype=np.float64)
  want[rows] = (m / (1 - B1 ** 2)) / (np.sqrt(v / (1 - B2 ** 2)) + EPS)
  return (want.T if tall else want), rows


@pytest.mark.parametrize("shape", [(7, 4), (4, 7)])
def test_top_norm_rows_of_the_shorter_side_get_adam(shape):
  # The paper (like GaLore) takes W in R^{m x n} with m <= n and selects r
  # of the m rows, so a selected row updates max(m, n) entries; a tall
  # matrix selects columns.
  rng = np.random.default_rng(0)
  g1 = rng.normal(size=shape).astype(np.float32)
  g2 = rng.normal(size=shape).astype(np.float32)
  tx = gx.scale_by_grass(rank=2, update_proj_gap=100, selection="top_norm",
                         b1=B1, b2=B2, eps=EPS)
  state = tx.init(jnp.zeros(shape))
  assert state.mu.shape == (2, max(shape))
  _, state = tx.update(jnp.asarray(g1), state)
  u2, state = tx.update(jnp.asarray(g2), state)
  want, rows = _reference_two_steps(g1, g2, 2)
  assert sorted(np.asarray(state.rows).tolist()) == sorted(rows.tolist())
  np.testing.assert_allclose(u2, want, rtol=1e-5, atol=1e-7)
  # Exactly rank * max(m, n) entries move.
  assert int(np.sum(np.asarray(u2) != 0)) == 2 * max(shape)


def test_norm_sampling_projection_is_unbiased():
  g = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)

  def ppt_g(key):
    idx, c = grass_mod.select_rows(g, 2, "norm_sampling", key)
    return jnp.zeros_like(g).at[idx].add(c[:, None] ** 2 * g[idx])

  est = jax.vmap(ppt_g)(jax.random.split(jax.random.key(0), 4000)).mean(0)
  np.testing.assert_allclose(est, g, atol=0.15)


@pytest.mark.parametrize("kw,name", [
    (dict(rank=0), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(selection="random"), "selection")])
def test_bad_input_names_the_argument(kw, name):
  with pytest.raises(ValueError, match=name):
    gx.grass(1e-3, **kw)


def test_rank_above_matrix_dimension_raises_at_init():
  with pytest.raises(ValueError, match="rank=3"):
    gx.grass(1e-3, rank=3).init({"w": jnp.zeros((8, 2))})
