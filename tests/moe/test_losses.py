"""Load-balancing loss normalisation, z-loss formula, MI loss and metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax.moe import losses, routing


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_balancing_exactly_one_under_uniform_routing(k):
  t, e = 64, 8
  # Uniform probabilities (zero logits), any assignment.
  r = routing.top_k_routing(jnp.zeros((t, e)), k)
  assert float(r.aux_losses["load_balancing_loss"]) == 1.0
  # Uniform counts, arbitrary probabilities: 1 up to the rounding of sum(P).
  rng = np.random.default_rng(k)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(t, e)), jnp.float32))
  idx = (np.arange(t)[:, None] + np.arange(k)[None, :] * 3) % e
  assert np.all(np.bincount(idx.reshape(-1), minlength=e) == t * k // e)
  np.testing.assert_allclose(
      losses.load_balancing_loss(probs, jnp.asarray(idx)), 1.0, rtol=1e-6)


def test_load_balancing_matches_switch_formula_and_gradient():
  rng = np.random.default_rng(0)
  t, e = 40, 5
  logits = rng.normal(size=(t, e)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  idx = probs.argmax(-1)[:, None]
  f = np.bincount(idx[:, 0], minlength=e) / t
  p_mean = probs.mean(0)
  expected = e * np.sum(f * p_mean)      # Switch: alpha * E * sum f_i P_i
  value, grad = jax.value_and_grad(losses.load_balancing_loss)(
      jnp.asarray(probs), jnp.asarray(idx))
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # Only P carries gradient: d/dp_i(t) = E * f_i / T.
  np.testing.assert_allclose(grad, np.broadcast_to(e * f / t, (t, e)),
                             rtol=1e-6)
  # Collapsed routing is penalised: all tokens on expert 0 with p_0 -> 1.
  onehot = jnp.zeros((t, e)).at[:, 0].set(1.0)
  assert float(losses.load_balancing_loss(onehot, jnp.zeros((t, 1), int))) == e


def test_router_z_loss_formula():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(9, 6)).astype(np.float32) * 3
  lse = np.log(np.exp(z.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(losses.router_z_loss(jnp.asarray(z)),
                             np.mean(lse ** 2), rtol=1e-6)
  np.testing.assert_allclose(losses.router_z_loss(jnp.zeros((3, 8))),
                             math.log(8) ** 2, rtol=1e-6)


def test_mutual_information_loss_balanced_one_hot_is_minus_log_e():
  e = 4
  probs = jnp.eye(e)[jnp.arange(16) % e]
  np.testing.assert_allclose(losses.mutual_information_loss(probs),
                             -math.log(e), rtol=1e-6)
  # Uniform soft routing has zero MI: -H(mean) + mean H = -log E + log E.
  np.testing.assert_allclose(
      losses.mutual_information_loss(jnp.full((5, e), 1 / e)), 0.0, atol=1e-6)


def test_routing_metrics():
  probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1],
                     [1 / 3, 1 / 3, 1 / 3]])
  idx = jnp.array([[0], [1], [0], [-1]])
  kept = jnp.array([[True], [True], [False], [False]])
  m = losses.routing_metrics(probs, idx, kept=kept)
  np.testing.assert_allclose(m["expert_load"], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(m["fraction_dropped"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["dead_experts"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["tokens_per_expert_max"], 1.0)
  np.testing.assert_allclose(m["max_violation"], (1 - 2 / 3) / (2 / 3),
                             rtol=1e-6)
  p = np.asarray(probs, np.float64)
  ent = -(p * np.log(p)).sum(-1).mean()
  np.testing.assert_allclose(m["router_entropy"], ent, rtol=1e-5)
  np.testing.assert_allclose(m["router_confidence"], p.max(-1).mean(),
                             rtol=1e-6)
