"""APOLLO and APOLLO-Mini against plain NumPy references of their rules."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import optimizers as gx

proj = importlib.import_module("gradax.optimizers._projection")
EPS = 1e-6


def test_channel_scaling_with_svd_basis_first_step():
  g = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  tx = gx.scale_by_apollo(rank=2, scale_type="channel", scale=4.0,
                          projection="svd", eps=EPS)
  u, _ = tx.update(jnp.asarray(g), tx.init(jnp.zeros((5, 3))))
  p = np.linalg.svd(g.astype(np.float64))[0][:, :2]
  r = p.T @ g                                   # (2, 3): rows are the rank
  r_tilde = r / (np.abs(r) + EPS)               # Adam's first step
  s = np.linalg.norm(r_tilde, axis=0) / (np.linalg.norm(r, axis=0) + 1e-8)
  np.testing.assert_allclose(u, g * s[None, :] * 2.0, rtol=1e-4)


def _reference_apollo_tensor(gs, p, gamma=1.01, b1=0.9, b2=0.999, eps=1e-8):
  """The reference code's loop (zhuhanqing/APOLLO apollo_torch/apollo.py) for
  one matrix, rank-1 right projection ``R = G p``, scale 1: Adam moments
  without bias correction, the tensor factor, the norm-growth limiter on the
  scaled gradient, and only then the step factor sqrt(1-b2^t)/(1-b1^t)."""
  m = v = 0.0
  prev, out = None, []
  for t, g in enumerate(gs, start=1):
    g = g.astype(np.float64)
    r = g @ p
    m = b1 * m + (1 - b1) * r
    v = b2 * v + (1 - b2) * r ** 2
    s = np.linalg.norm(m / (np.sqrt(v) + eps)) / (np.linalg.norm(r) + 1e-8)
    scaled = g * s
    if prev is None:
      prev = np.linalg.norm(scaled)
    else:
      n = np.linalg.norm(scaled)
      limiter = max(n / (prev + 1e-8), gamma) / gamma
      scaled = scaled / limiter
      prev = n / limiter
    out.append(np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * scaled)
  return out, prev


def test_tensor_scaling_and_norm_growth_limiter_match_reference_loop():
  rng = np.random.default_rng(1)
  g1 = rng.normal(size=(3, 6)).astype(np.float32)
  # Right projection (3 < 6): P is the top right singular vector of g1.
  p = np.linalg.svd(g1.astype(np.float64))[2][:1].T
  # A gradient nearly orthogonal to the basis has a tiny projection, so its
  # scale factor (and update norm) jumps at step 2: the limiter binds.
  g2 = rng.normal(size=(3, 6))
  g2 = (g2 - 0.99 * (g2 @ p) @ p.T).astype(np.float32)
  gs = [g1, g2] + [rng.normal(size=(3, 6)).astype(np.float32)
                   for _ in range(4)]
  want, want_prev = _reference_apollo_tensor(gs, p)
  tx = gx.scale_by_apollo(rank=1, scale_type="tensor", projection="svd",
                          update_proj_gap=100, eps=1e-8)
  free = gx.scale_by_apollo(rank=1, scale_type="tensor", projection="svd",
                            update_proj_gap=100, eps=1e-8,
                            norm_growth_limit=None)
  state = tx.init(jnp.zeros((3, 6)))
  free_state = free.init(jnp.zeros((3, 6)))
  for t, g in enumerate(gs):
    u, state = tx.update(jnp.asarray(g), state)
    unlimited, free_state = free.update(jnp.asarray(g), free_state)
    np.testing.assert_allclose(u, want[t], rtol=1e-4, atol=1e-7)
    if t == 1:
      # Step 2 is limited (a shorter step in the same direction).
      assert np.linalg.norm(unlimited) > 1.5 * np.linalg.norm(want[1])
      np.testing.assert_allclose(
          u, unlimited * (np.linalg.norm(u) / np.linalg.norm(unlimited)),
          rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(state.prev_norm, want_prev, rtol=1e-4)


def test_vectors_get_adam_by_default():
  g = jnp.array([1.0, -3.0])
  tx = gx.scale_by_apollo(rank=1, eps=EPS)
  u, _ = tx.update(g, tx.init(jnp.zeros(2)))
  np.testing.assert_allclose(u, np.asarray(g) / (np.abs(g) + EPS), rtol=2e-5)


def test_gaussian_basis_preserves_squared_norm_in_expectation():
  g = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 2000)
  norms = jax.vmap(lambda k: jnp.sum(jnp.square(
      proj.project(g, proj.gaussian_basis(k, (8, 4), 2)))))(keys)
  np.testing.assert_allclose(norms.mean(), jnp.sum(g ** 2), rtol=0.05)


def test_apollo_mini_state_bytes():
  params = {"w": jnp.zeros((64, 256)), "b": jnp.zeros((256,))}
  state = gx.apollo_mini(1e-3, vector_mode="apollo").init(params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  # w: 2 x (1, 64) f32 + prev norm; b as (1, 256): 2 x (1, 1) + prev norm.
  assert nbytes == (2 * 64 * 4 + 4) + (2 * 4 + 4) + 4
  adam_vec = gx.apollo_mini(1e-3).init(params)
  assert sum(x.nbytes for x in jax.tree.leaves(adam_vec)) == (
      nbytes - 2 * 4 + 2 * 256 * 4)


@pytest.mark.parametrize("kw,name", [
    (dict(rank=0), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(scale_type="row"), "scale_type"),
    (dict(norm_growth_limit=1.0), "norm_growth_limit")])
def test_bad_input_names_the_argument(kw, name):
  with pytest.raises(ValueError, match=name):
    gx.apollo(1e-3, **kw)


def test_rank_above_matrix_dimension_raises_at_init():
  with pytest.raises(ValueError, match="rank=3"):
    gx.apollo(1e-3, rank=3).init({"w": jnp.zeros((2, 5))})
