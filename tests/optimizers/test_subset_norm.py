"""Subset-Norm AdaGrad and Subspace-Momentum against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import optimizers as gx
from gradax.optimizers import subset_norm as sn

EPS = 1e-8


def test_subsets_heuristic():
  assert sn.subsets((4, 2), None) == (4, 2)     # a row of the longer side
  assert sn.subsets((2, 7), None) == (7, 2)
  assert sn.subsets((10,), None) == (3, 4)      # ceil(sqrt(10)) = 4
  assert sn.subsets((10,), 5) == (2, 5)


def test_subset_norm_adagrad_two_steps():
  rng = np.random.default_rng(0)
  gs = [{"m": rng.normal(size=(4, 2)), "v": rng.normal(size=(10,))}
        for _ in range(2)]
  tx = gx.scale_by_subset_norm(eps=EPS)
  state = tx.init(jax.tree.map(jnp.zeros_like, gs[0]))
  acc_m, acc_v = np.zeros(4), np.zeros(3)
  for g in gs:
    u, state = tx.update(jax.tree.map(jnp.float32, g), state)
    acc_m += np.sum(g["m"] ** 2, axis=1)                # one per row
    vpad = np.pad(g["v"], (0, 2)).reshape(3, 4)         # subsets of 4
    acc_v += np.sum(vpad ** 2, axis=1)
    np.testing.assert_allclose(
        u["m"], g["m"] / (np.sqrt(acc_m)[:, None] + EPS), rtol=1e-5)
    want_v = (vpad / (np.sqrt(acc_v)[:, None] + EPS)).reshape(-1)[:10]
    np.testing.assert_allclose(u["v"], want_v, rtol=1e-5)
  assert state.nu["m"].shape == (4,) and state.nu["v"].shape == (3,)


def _svd_left(g, r):
  return np.linalg.svd(g.astype(np.float64))[0][:, :r]


def test_subspace_momentum_keeps_momentum_only_in_the_subspace():
  rng = np.random.default_rng(1)
  g1, g2 = (rng.normal(size=(6, 3)).astype(np.float32) for _ in range(2))
  b1 = 0.9
  tx = gx.scale_by_subspace_momentum(1, b1=b1, update_proj_gap=100)
  state = tx.init(jnp.zeros((6, 3)))
  u1, state = tx.update(jnp.asarray(g1), state)
  np.testing.assert_allclose(u1, g1, rtol=1e-4, atol=1e-5)  # m̂_1 = Pᵀg1
  u2, state = tx.update(jnp.asarray(g2), state)
  p = _svd_left(g1, 1)
  m = b1 * (1 - b1) * (p.T @ g1) + (1 - b1) * (p.T @ g2)
  want = p @ (m / (1 - b1 ** 2)) + (g2 - p @ (p.T @ g2))
  np.testing.assert_allclose(u2, want, rtol=1e-4, atol=1e-5)
  assert state.mu.shape == (1, 3)


def test_sn_sm_divides_subspace_momentum_by_the_raw_gradient_subset_norm():
  rng = np.random.default_rng(2)
  g1, g2 = (rng.normal(size=(6, 3)).astype(np.float32) for _ in range(2))
  b1, b2 = 0.9, 0.99
  tx = gx.scale_by_subset_norm_subspace_momentum(
      rank=1, b1=b1, b2=b2, eps=EPS, update_proj_gap=100)
  state = tx.init(jnp.zeros((6, 3)))
  _, state = tx.update(jnp.asarray(g1), state)
  u2, _ = tx.update(jnp.asarray(g2), state)
  p = _svd_left(g1, 1)
  m = b1 * (1 - b1) * (p.T @ g1) + (1 - b1) * (p.T @ g2)
  num = p @ (m / (1 - b1 ** 2)) + (g2 - p @ (p.T @ g2))
  v = (b2 * (1 - b2) * np.sum(g1 ** 2, 1) + (1 - b2) * np.sum(g2 ** 2, 1))
  want = num / (np.sqrt(v / (1 - b2 ** 2))[:, None] + EPS)
  np.testing.assert_allclose(u2, want, rtol=1e-4, atol=1e-5)


def test_state_bytes_are_a_fraction_of_adam():
  params = jnp.zeros((64, 256))
  state = gx.subset_norm_subspace_momentum(1e-3, rank=8).init(params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  # mu (8, 64), nu (256,), basis (256, 8), count.
  assert nbytes == 4 * (8 * 64 + 256 + 256 * 8) + 4
  assert nbytes / params.size < 1.6


@pytest.mark.parametrize("kw,name", [
    (dict(subset_size=0), "subset_size"), (dict(b2=1.5), "b2"),
    (dict(rank=0), "rank"), (dict(update_proj_gap=0), "update_proj_gap")])
def test_bad_input_names_the_argument(kw, name):
  kw = {"rank": 1, **kw}
  with pytest.raises(ValueError, match=name):
    gx.subset_norm_subspace_momentum(1e-3, **kw)


def test_rank_above_matrix_dimension_raises_at_init():
  with pytest.raises(ValueError, match="rank=4"):
    gx.subspace_momentum(1e-3, rank=4).init({"w": jnp.zeros((3, 8))})
