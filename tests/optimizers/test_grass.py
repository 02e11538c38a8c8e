"""Grass against a NumPy reference; unbiasedness of norm sampling."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import optimizers as gx

grass_mod = importlib.import_module("gradax.optimizers.grass")
B1, B2, EPS = 0.9, 0.99, 1e-8


def test_top_norm_rows_get_adam_and_other_rows_stay_zero():
  rng = np.random.default_rng(0)
  g1 = rng.normal(size=(5, 2)).astype(np.float32)
  g1[3] *= 10.0
  g1[1] *= 5.0
  g2 = rng.normal(size=(5, 2)).astype(np.float32)
  tx = gx.scale_by_grass(rank=2, update_proj_gap=100, selection="top_norm",
                         b1=B1, b2=B2, eps=EPS)
  state = tx.init(jnp.zeros((5, 2)))
  _, state = tx.update(jnp.asarray(g1), state)
  u2, state = tx.update(jnp.asarray(g2), state)
  rows = [3, 1]
  assert sorted(np.asarray(state.rows).tolist()) == sorted(rows)
  m = B1 * (1 - B1) * g1[rows] + (1 - B1) * g2[rows]
  v = B2 * (1 - B2) * g1[rows] ** 2 + (1 - B2) * g2[rows] ** 2
  want = np.zeros((5, 2))
  want[rows] = (m / (1 - B1 ** 2)) / (np.sqrt(v / (1 - B2 ** 2)) + EPS)
  np.testing.assert_allclose(u2, want, rtol=1e-5, atol=1e-7)


def test_wide_matrices_select_columns():
  g = np.zeros((2, 6), np.float32)
  g[:, 4] = [3.0, -1.0]
  tx = gx.scale_by_grass(rank=1, selection="top_norm", eps=EPS)
  u, _ = tx.update(jnp.asarray(g), tx.init(jnp.zeros((2, 6))))
  want = np.zeros((2, 6))
  want[:, 4] = np.sign(g[:, 4])
  np.testing.assert_allclose(u, want, rtol=2e-5)


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
