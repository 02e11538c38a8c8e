"""Every dispatcher matches the per-expert loop oracle (forward and gradients),
and the oracle matches a per-token NumPy reference written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax.moe import dispatch, routing

T, D, H, E, K = 12, 6, 10, 4, 2


def _gelu(x):
  return np.asarray(jax.nn.gelu(jnp.asarray(x)))


def _problem(seed, gated=False):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  wr = jnp.asarray(rng.normal(size=(D, E)), jnp.float32)
  p = {"wi": jnp.asarray(rng.normal(size=(E, D, H)) / 3, jnp.float32),
       "wo": jnp.asarray(rng.normal(size=(E, H, D)) / 3, jnp.float32)}
  if gated:
    p["wg"] = jnp.asarray(rng.normal(size=(E, D, H)) / 3, jnp.float32)
  return x, wr, p


def _numpy_reference(x, idx, w, p, kept):
  x, idx, w, kept = map(np.asarray, (x, idx, w, kept))
  pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
  y = np.zeros(x.shape)
  for t in range(x.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[t, j]
      if e < 0 or not kept[t, j]:
        continue
      h = x[t] @ pn["wi"][e]
      h = _gelu(x[t] @ pn["wg"][e]) * h if "wg" in pn else _gelu(h)
      y[t] += w[t, j] * (h @ pn["wo"][e])
  return y


@pytest.mark.parametrize("gated,capacity", [(False, None), (True, 3)])
def test_oracle_matches_numpy_per_token_reference(gated, capacity):
  x, wr, p = _problem(0, gated)
  r = routing.top_k_routing(x @ wr, K)
  y, kept = dispatch.loop_dispatch(x, r.expert_index, r.combine_weights, p,
                                   capacity=capacity)
  ref = _numpy_reference(x, r.expert_index, r.combine_weights, p, kept)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  if capacity is not None:
    assert int(kept.sum()) < T * K   # the case really drops something


def _loss(name, capacity, x, wr, p):
  r = routing.top_k_routing(x @ wr, K, renormalize=True)
  y, _ = dispatch.DISPATCHERS[name](x, r.expert_index, r.combine_weights, p,
                                    capacity=capacity)
  return jnp.sum(jnp.sin(y) * jnp.arange(D))


@functools.lru_cache(maxsize=None)
def _grads(name, capacity, gated):
  # One jitted program per case; the oracle's gradients are shared.
  return jax.jit(jax.grad(lambda *a: _loss(name, capacity, *a),
                          argnums=(0, 1, 2)))(*_problem(1, gated))


@pytest.mark.parametrize("name", ["einsum", "sorted"])
@pytest.mark.parametrize("gated,capacity", [(False, None), (True, 3)])
def test_dispatcher_matches_oracle_forward_and_gradients(name, capacity, gated):
  x, wr, p = _problem(1, gated)
  r = routing.top_k_routing(x @ wr, K)
  y, kept = dispatch.DISPATCHERS[name](x, r.expert_index, r.combine_weights, p,
                                       capacity=capacity)
  y0, kept0 = dispatch.loop_dispatch(x, r.expert_index, r.combine_weights, p,
                                     capacity=capacity)
  np.testing.assert_allclose(y, y0, atol=1e-5)
  np.testing.assert_array_equal(kept, kept0)
  g = _grads(name, capacity, gated)
  g0 = _grads("loop", capacity, gated)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(g[1]).max()) > 0   # the router really gets gradient


@pytest.mark.parametrize("name", ["einsum", "sorted"])
def test_expert_choice_and_missing_assignments(name):
  # Expert choice gives k = E columns with -1 holes; every path must agree.
  x, wr, p = _problem(2)
  r = routing.expert_choice_routing(x @ wr, capacity_factor=1.5)
  assert int((r.expert_index < 0).sum()) > 0
  y, _ = dispatch.DISPATCHERS[name](x, r.expert_index, r.combine_weights, p)
  y0, kept0 = dispatch.loop_dispatch(x, r.expert_index, r.combine_weights, p)
  np.testing.assert_allclose(y, y0, atol=1e-5)
  ref = _numpy_reference(x, r.expert_index, r.combine_weights, p, kept0)
  np.testing.assert_allclose(y0, ref, atol=1e-5)


def test_permute_backward_is_inverse_gather():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
  perm = jnp.asarray(rng.permutation(7))
  inv = jnp.argsort(perm)
  c = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
  np.testing.assert_array_equal(dispatch.permute(x, perm, inv), x[perm])
  g = jax.grad(lambda x: jnp.sum(dispatch.permute(x, perm, inv) * c))(x)
  np.testing.assert_array_equal(g, np.asarray(c)[np.asarray(inv)])


def test_unknown_dispatcher_and_bad_capacity():
  with pytest.raises(ValueError, match="dispatch='ragged'"):
    dispatch.get_dispatcher("ragged")
  x, wr, p = _problem(4)
  r = routing.top_k_routing(x @ wr, K)
  with pytest.raises(ValueError, match="capacity=0"):
    dispatch.einsum_dispatch(x, r.expert_index, r.combine_weights, p,
                             capacity=0)
