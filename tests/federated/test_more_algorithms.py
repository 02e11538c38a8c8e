"""Decentralised FedAvg/DFedSAM, masked aggregation, FedCM, pFedMe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import federated as fl
from gradax.federated.core import sam_grad_fn
from gradax.federated.decentralized import (DecentralizedState,
                                            check_mixing_matrix)
from gradax.federated.masked import coverage
from gradax.federated.pfedme import personalize


def _quad(params, batch):
  l = 0.5 * jnp.sum((params["w"] - batch["a"]) ** 2, -1)
  return jnp.sum(l * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


@pytest.fixture(scope="module")
def quad_data():
  a = np.arange(12, dtype=np.float32).reshape(4, 1, 3)
  return fl.as_client_data({"a": a}, np.ones(4, np.int32))


def test_mixing_matrices_are_doubly_stochastic():
  for topo in ("ring", "full", "exponential"):
    w = fl.mixing_matrix(topo, 6)
    check_mixing_matrix(w)
  with pytest.raises(ValueError, match="doubly stochastic"):
    check_mixing_matrix([[1.0, 0.0], [1.0, 0.0]])
  with pytest.raises(ValueError, match="topology"):
    fl.mixing_matrix("star", 4)


def test_gossip_only_round_is_w_to_the_q(quad_data):
  w = fl.mixing_matrix("ring", 4)
  alg = fl.dfedavg(_quad, optax.sgd(0.1), fl.LocalConfig(1, "steps", 1), w,
                   gossip_steps=2)
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  st = DecentralizedState({"w": jnp.asarray(x)}, jnp.zeros((), jnp.int32))
  inp = fl.make_round_input(np.ones(4, bool), jax.random.key(0), 0)  # no work
  new, diag = jax.jit(alg.round)(st, quad_data, inp)
  np.testing.assert_allclose(new.params["w"], np.linalg.matrix_power(w, 2) @ x,
                             rtol=1e-5)
  assert float(diag["consensus_distance"]) < np.sum((x - x.mean(0))**2) / 4


def test_dfedsam_full_mixing_reaches_consensus(quad_data):
  alg = fl.dfedsam(_quad, optax.sgd(0.5), fl.LocalConfig(1, "steps", 2),
                   fl.mixing_matrix("full", 4), rho=0.01)
  st = alg.init({"w": jnp.zeros(3)})
  new, diag = jax.jit(alg.round)(st, quad_data, fl.make_round_input(
      np.ones(4, bool), jax.random.key(0), 2))
  p = np.asarray(new.params["w"])
  np.testing.assert_allclose(p, np.broadcast_to(p[0], p.shape), atol=1e-6)
  assert float(diag["consensus_distance"]) < 1e-8


def test_sam_gradient_closed_form():
  loss = lambda p, b: 0.5 * jnp.sum(p["w"] ** 2)  # noqa: E731
  w = jnp.array([3.0, 4.0])
  _, g = sam_grad_fn(loss, 0.5)({"w": w}, {}, {})
  np.testing.assert_allclose(g["w"], w + 0.5 * w / 5.0, rtol=1e-6)


def test_masked_aggregation_coverage(quad_data):
  masks = {"w": np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]],
                         np.float32)}
  assert coverage(masks) == 0                           # coordinate 2
  alg = fl.masked_fedavg(_quad, optax.sgd(1.0), fl.LocalConfig(1, "steps", 1),
                         masks)
  st = alg.init({"w": jnp.zeros(3)})
  part = np.array([1, 1, 0, 1], bool)
  new, _ = jax.jit(alg.round)(st, quad_data, fl.make_round_input(
      part, jax.random.key(0), 1))
  a = np.asarray(quad_data.examples["a"][:, 0])
  # one SGD step with lr 1 on the masked quadratic moves w_j to a_j (covered)
  want0 = a[[0, 1, 3], 0].mean()
  want1 = a[0, 1]                                       # only client 0 covers
  np.testing.assert_allclose(new.params["w"], [want0, want1, 0.0], rtol=1e-6)


def test_fedcm_alpha_one_is_fedavg(quad_data):
  local = fl.LocalConfig(1, "steps", 2)
  cm = fl.fedcm(_quad, 0.3, local, 4, alpha=1.0)
  avg = fl.fedavg(_quad, optax.sgd(0.3), local, 4,
                  aggregator=fl.participant_mean())
  inp = fl.make_round_input(np.array([1, 0, 1, 1], bool), jax.random.key(0), 2)
  p0 = {"w": jnp.ones(3)}
  a, _ = jax.jit(cm.round)(cm.init(p0), quad_data, inp)
  b, _ = jax.jit(avg.round)(avg.init(p0), quad_data, inp)
  np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6)
  # the stored direction is the per-step mean gradient estimate
  np.testing.assert_allclose(a.agg_state[1]["w"],
                             -(b.params["w"] - 1.0) / (0.3 * 2), rtol=1e-5)


def test_pfedme_personalize_closed_form():
  a = jnp.array([2.0, -1.0])
  w = {"w": jnp.array([0.0, 1.0])}
  lam = 3.0
  loss = lambda p, b: 0.5 * jnp.sum((p["w"] - b["a"]) ** 2)  # noqa: E731
  theta = personalize(loss, w, {"a": a}, lam, 0.1, 300)
  np.testing.assert_allclose(theta["w"], (a + lam * w["w"]) / (1 + lam),
                             rtol=1e-4)
  with pytest.raises(ValueError, match="lam"):
    fl.pfedme(loss, fl.LocalConfig(1), 2, lam=0.0)


def test_hypergradient_server_rate():
  tx = fl.scale_by_hypergradient()
  p1 = {"w": jnp.array([1.0, 0.0])}
  p2 = {"w": jnp.array([0.5, 2.0])}
  s = tx.init(p1)
  u1, s = tx.update(p1, s)
  np.testing.assert_allclose(u1["w"], -p1["w"])          # agg_1 = 0
  u2, s = tx.update(p2, s)
  np.testing.assert_allclose(u2["w"], -(1 + 0.5) * p2["w"], rtol=1e-6)
  big = {"w": jnp.array([100.0, 0.0])}
  _, s = tx.update(big, s)
  _, s = tx.update(big, s)
  assert float(s.agg) == pytest.approx(4.0)              # clipped at 4
  neg = {"w": jnp.array([-100.0, 0.0])}
  _, s = tx.update(neg, s)
  assert float(s.agg) == pytest.approx(-0.8)             # clipped at -0.8


def test_fedspeed_without_sam_and_prox_is_fedavg_plus_mean_h(quad_data):
  local = fl.LocalConfig(1, "steps", 2)
  fs = fl.fedspeed(_quad, 0.3, local, 4, rho=0.0, lam=0.0, weight_decay=0.0,
                   clip_norm=1e6)
  avg = fl.fedavg(_quad, optax.sgd(0.3), local, 4,
                  aggregator=fl.participant_mean())
  part = np.array([1, 1, 0, 1], bool)
  inp = fl.make_round_input(part, jax.random.key(0), 2)
  p0 = {"w": jnp.ones(3)}
  a, _ = jax.jit(fs.round)(fs.init(p0), quad_data, inp)
  b, _ = jax.jit(avg.round)(avg.init(p0), quad_data, inp)
  mean_delta = np.asarray(b.params["w"]) - 1.0
  np.testing.assert_allclose(a.params["w"],
                             np.asarray(b.params["w"]) + 3 * mean_delta / 4,
                             rtol=1e-5)
  np.testing.assert_allclose(a.h["w"][2], 0.0)           # absent client


def test_fedamd_anchor_then_sarah_miners_closed_form(quad_data):
  # anchor_prob=2: round 0 everybody is an anchor, round 1 everybody mines.
  # On f_n(y) = |y - a_n|^2/2, SARAH gives v_k = (1-g)^k v_0, so
  # y_K = x - g * sum_k (1-g)^k v_0 with v_0 = (1/N) sum_S (x - a_n).
  n, k, gamma = 4, 3, 0.2
  alg = fl.fedamd(_quad, gamma, fl.LocalConfig(1, "steps", k), n,
                  anchor_prob=2)
  rnd = jax.jit(alg.round)
  part = np.array([1, 1, 0, 1], bool)
  x0 = np.ones(3, np.float32)
  s0 = alg.init({"w": jnp.asarray(x0)})
  s1, d1 = rnd(s0, quad_data, fl.make_round_input(part, jax.random.key(0), k))
  assert int(d1["num_anchors"]) == 3 and int(d1["num_miners"]) == 0
  np.testing.assert_allclose(s1.params["w"], x0)          # anchors only
  a = np.asarray(quad_data.examples["a"][:, 0])
  np.testing.assert_allclose(s1.anchor_grads["w"][part], x0 - a[part],
                             rtol=1e-6)
  s2, d2 = rnd(s1, quad_data, fl.make_round_input(part, jax.random.key(1), k))
  assert int(d2["num_miners"]) == 3
  v0 = (x0 - a[part]).sum(0) / n
  want = x0 - gamma * sum((1 - gamma) ** j for j in range(k)) * v0
  np.testing.assert_allclose(s2.params["w"], want, rtol=1e-5)
