"""Routers against plain NumPy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax.moe import routing


def _softmax(z):
  z = np.asarray(z, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _logits(seed, t=16, e=8):
  return np.random.default_rng(seed).normal(size=(t, e)).astype(np.float32)


@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_softmax_then_topk(renormalize):
  z = _logits(0)
  r = routing.top_k_routing(jnp.asarray(z), 3, renormalize=renormalize)
  p = _softmax(z)
  idx = np.argsort(-p, axis=-1, kind="stable")[:, :3]
  w = np.take_along_axis(p, idx, -1)
  if renormalize:
    w = w / w.sum(-1, keepdims=True)
  np.testing.assert_array_equal(r.expert_index, idx)
  np.testing.assert_allclose(r.combine_weights, w, rtol=1e-5)
  np.testing.assert_allclose(r.router_probs, p, rtol=1e-5)
  assert r.expert_index.dtype == jnp.int32
  assert r.combine_weights.dtype == jnp.float32


def test_top_k_topk_then_softmax():
  z = _logits(1)
  r = routing.top_k_routing(jnp.asarray(z), 2, order="topk_softmax")
  idx = np.argsort(-z, axis=-1, kind="stable")[:, :2]
  w = _softmax(np.take_along_axis(z, idx, -1))
  np.testing.assert_array_equal(r.expert_index, idx)
  np.testing.assert_allclose(r.combine_weights, w, rtol=1e-5)


def test_router_math_is_float32_for_bf16_inputs():
  x = jnp.ones((4, 3), jnp.bfloat16)
  z = routing.router_logits(x, jnp.ones((3, 5), jnp.bfloat16))
  assert z.dtype == jnp.float32
  r = routing.top_k_routing(z.astype(jnp.bfloat16), 2)
  assert r.combine_weights.dtype == jnp.float32


def test_jitter_is_multiplicative_on_router_input():
  x = jnp.ones((200, 1))
  w = jnp.ones((1, 2))
  z = routing.router_logits(x, w, jitter_eps=0.1, rng=jax.random.key(0))
  assert float(z.min()) >= 0.9 and float(z.max()) <= 1.1
  assert float(z.std()) > 0.01
  np.testing.assert_array_equal(z[:, 0], z[:, 1])   # one factor per input
  with pytest.raises(ValueError, match="rng"):
    routing.router_logits(x, w, jitter_eps=0.1)


def test_switch_is_argmax_with_probability_gate():
  z = _logits(2)
  r = routing.switch_routing(jnp.asarray(z))
  p = _softmax(z)
  np.testing.assert_array_equal(r.expert_index[:, 0], p.argmax(-1))
  np.testing.assert_allclose(r.combine_weights[:, 0], p.max(-1), rtol=1e-5)


def test_gshard_top2_normalised_and_random_second_expert():
  z = _logits(3, t=4000, e=4)
  r = routing.gshard_top2_routing(jnp.asarray(z))
  np.testing.assert_allclose(r.combine_weights.sum(-1), 1.0, rtol=1e-5)
  assert int((r.expert_index < 0).sum()) == 0
  rr = routing.gshard_top2_routing(jnp.asarray(z), rng=jax.random.key(0))
  g2 = np.asarray(r.combine_weights[:, 1])
  kept2 = np.asarray(rr.expert_index[:, 1] >= 0)
  np.testing.assert_array_equal(rr.expert_index[:, 0], r.expert_index[:, 0])
  # Kept with probability min(1, 2 g2): compare the empirical rate.
  assert abs(kept2.mean() - np.minimum(1, 2 * g2).mean()) < 0.03
  assert float(rr.combine_weights[~kept2, 1].max()) == 0.0


def test_expert_choice_each_expert_takes_its_top_tokens():
  z = _logits(4, t=12, e=4)
  r = routing.expert_choice_routing(jnp.asarray(z), capacity_factor=2.0)
  p = _softmax(z)
  c = 6                                             # ceil(2 * 12 / 4)
  idx = np.asarray(r.expert_index)
  for e in range(4):
    chosen = np.nonzero(idx[:, e] == e)[0]
    np.testing.assert_array_equal(
        np.sort(chosen), np.sort(np.argsort(-p[:, e], kind="stable")[:c]))
    np.testing.assert_allclose(r.combine_weights[chosen, e], p[chosen, e],
                               rtol=1e-5)
  assert set(np.unique(idx[idx != np.arange(4)])) == {-1}
  assert float(r.aux_losses["load_balancing_loss"]) == 1.0


def test_hash_routing_is_a_fixed_balanced_function_of_the_id():
  ids = jnp.arange(8000) % 1000
  r = routing.hash_routing(ids, 8)
  idx = np.asarray(r.expert_index[:, 0])
  np.testing.assert_array_equal(idx[:1000], idx[1000:2000])  # same id, same e
  counts = np.bincount(idx[:1000], minlength=8)
  assert counts.min() > 90 and counts.max() < 160          # ~125 each
  assert not np.array_equal(
      idx, np.asarray(routing.hash_routing(ids, 8, seed=1).expert_index[:, 0]))
  np.testing.assert_array_equal(r.combine_weights, 1.0)


def test_m6t_k_top1_per_prototype():
  z = _logits(5, e=8)
  r = routing.m6t_routing(jnp.asarray(z), 2)
  for j in range(2):
    pj = _softmax(z[:, 4 * j: 4 * j + 4])
    np.testing.assert_array_equal(r.expert_index[:, j], 4 * j + pj.argmax(-1))
    np.testing.assert_allclose(r.combine_weights[:, j], pj.max(-1), rtol=1e-5)
  with pytest.raises(ValueError, match="num_experts=8 is not divisible by k=3"):
    routing.m6t_routing(jnp.asarray(z), 3)


@pytest.mark.parametrize("k", [0, 9])
def test_bad_k_raises_naming_it(k):
  with pytest.raises(ValueError, match=f"k={k}.*num_experts=8"):
    routing.top_k_routing(jnp.zeros((4, 8)), k)


def test_bad_order_raises():
  with pytest.raises(ValueError, match="order='sorted'"):
    routing.top_k_routing(jnp.zeros((4, 8)), 2, order="sorted")
