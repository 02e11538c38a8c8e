"""Aggregators, FedOpt server optimizers, FedProx hook, SCAFFOLD round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import federated as fl
from gradax.federated.aggregators import AggregatorInput, clip_by_norm
from gradax.federated.fedopt import scale_by_server_adagrad


def _inp(u, valid, n_ex=None, ids=None, n_total=None):
  c = u.shape[0]
  ids = np.arange(c) if ids is None else ids
  n_total = c if n_total is None else n_total
  part = np.zeros(n_total, bool)
  part[ids[valid]] = True
  return AggregatorInput({"u": jnp.asarray(u)}, jnp.asarray(ids, jnp.int32),
                         jnp.asarray(valid),
                         jnp.asarray(np.ones(c) if n_ex is None else n_ex),
                         jnp.asarray(part))


def test_weighting_rules():
  rng = np.random.default_rng(0)
  u = rng.normal(size=(5, 3)).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 0], bool)
  n_ex = np.array([3, 1, 9, 6, 2], np.float32)
  u[~valid] = 0
  inp = _inp(u, valid, n_ex, n_total=5)
  got = fl.example_weighted_mean().apply(inp, ())[0]["u"]
  want = (n_ex[valid, None] * u[valid]).sum(0) / n_ex[valid].sum()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got = fl.participant_mean().apply(inp, ())[0]["u"]
  np.testing.assert_allclose(got, u[valid].mean(0), rtol=1e-6)
  got = fl.average_all(5).apply(inp, ())[0]["u"]
  np.testing.assert_allclose(got, u[valid].sum(0) / 5, rtol=1e-6)
  p = np.array([0.5, 0.25, 1.0, 0.8, 0.1])
  got = fl.known_probability(p).apply(inp, ())[0]["u"]
  np.testing.assert_allclose(got, (u[valid] / p[valid, None]).sum(0) / 5,
                             rtol=1e-6)


def test_nobody_participates_gives_zero_not_nan():
  inp = _inp(np.zeros((3, 2), np.float32), np.zeros(3, bool))
  for agg in (fl.example_weighted_mean(), fl.participant_mean(),
              fl.coordinate_median(), fl.trimmed_mean(0.2)):
    out = agg.apply(inp, agg.init(None, 3))[0]["u"]
    np.testing.assert_array_equal(out, np.zeros(2))


def test_median_and_trimmed_mean_match_numpy():
  rng = np.random.default_rng(1)
  u = rng.normal(size=(7, 4)).astype(np.float32)
  u[2] = 1e6                                          # an outlier
  valid = np.array([1, 1, 1, 1, 1, 1, 0], bool)
  inp = _inp(u, valid)
  med = fl.coordinate_median().apply(inp, ())[0]["u"]
  np.testing.assert_allclose(med, np.median(u[valid], 0), rtol=1e-6)
  tm = fl.trimmed_mean(0.2).apply(inp, ())[0]["u"]
  k = int(0.2 * valid.sum())
  s = np.sort(u[valid], 0)[k:valid.sum() - k]
  np.testing.assert_allclose(tm, s.mean(0), rtol=1e-5)
  assert np.all(np.abs(tm) < 10)                      # outlier trimmed


def test_gaussian_dp_clips_and_noises():
  u = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], np.float32)
  clipped, norms = clip_by_norm({"u": jnp.asarray(u)}, 1.0)
  np.testing.assert_allclose(clipped["u"][0], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(clipped["u"][1], [0.3, 0.4], rtol=1e-6)
  np.testing.assert_allclose(norms, [5.0, 0.5, 0.0], atol=1e-6)
  valid = np.array([1, 1, 0], bool)
  no_noise = fl.gaussian_dp(fl.participant_mean(), 1.0, 0.0)
  out, st = no_noise.apply(_inp(u, valid), no_noise.init(None, 3))
  np.testing.assert_allclose(out["u"], [0.45, 0.6], rtol=1e-6)
  # noise: empirical std over many coordinates equals sigma*C/|S|
  dp = fl.gaussian_dp(fl.participant_mean(), 1.0, 2.0, seed=3)
  big = np.zeros((2, 20000), np.float32)
  out, st = dp.apply(_inp(big, np.array([1, 1], bool)), dp.init(None, 2))
  assert abs(float(np.std(out["u"])) - 1.0) < 0.03   # 2.0 * 1.0 / 2
  assert float(st.noise_std) == pytest.approx(1.0)
  assert int(st.rounds) == 1
  with pytest.raises(ValueError, match="clip_norm"):
    fl.gaussian_dp(fl.participant_mean(), 0.0, 1.0)


def test_bad_aggregator_arguments():
  for p in ([0.5, 0.0], [1.2, 0.5], [-0.1], [np.nan]):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
      fl.known_probability(p)
  with pytest.raises(ValueError, match="trim"):
    fl.trimmed_mean(0.5)


def test_server_adagrad_and_fedadam_rules():
  g = {"w": jnp.array([1.0, -2.0])}
  tx = scale_by_server_adagrad(1e-3)
  s = tx.init(g)
  u1, s = tx.update(g, s)
  u2, s = tx.update(g, s)
  np.testing.assert_allclose(u1["w"], np.array([1, -2]) /
                             (np.abs([1, -2]) + 1e-3), rtol=1e-6)
  np.testing.assert_allclose(u2["w"], np.array([1, -2]) /
                             (np.sqrt(2) * np.abs([1, -2]) + 1e-3), rtol=1e-6)


def _lsq(params, batch):
  r = batch["x"] @ params["w"] - batch["y"]
  return jnp.sum(0.5 * r**2 * batch["mask"]) / jnp.maximum(
      jnp.sum(batch["mask"]), 1.0)


@pytest.fixture(scope="module")
def small_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6, 3)).astype(np.float32)
  y = rng.normal(size=(4, 6)).astype(np.float32)
  return fl.as_client_data({"x": x, "y": y}, np.array([6, 4, 6, 2]))


def test_fedadam_applies_adam_to_the_pseudo_gradient(small_data):
  local = fl.LocalConfig(2, "steps", 2)
  adam = fl.fedadam(_lsq, optax.sgd(0.1), local, 4, eta=0.1)
  avg = fl.fedavg(_lsq, optax.sgd(0.1), local, 4)
  p0 = {"w": jnp.ones(3)}
  inp = fl.make_round_input(np.ones(4, bool), jax.random.key(0), 2)
  a, _ = jax.jit(adam.round)(adam.init(p0), small_data, inp)
  b, _ = jax.jit(avg.round)(avg.init(p0), small_data, inp)
  delta = b.params["w"] - p0["w"]                    # FedAvg's mean update
  tx = optax.adam(0.1, b1=0.9, b2=0.99, eps=1e-3)
  upd, _ = tx.update({"w": -delta}, tx.init(p0))
  np.testing.assert_allclose(a.params["w"], p0["w"] + upd["w"], rtol=1e-5)


def test_scaffold_round_matches_reference(small_data):
  n, steps, lr = 4, 3, 0.1
  alg = fl.scaffold(_lsq, lr, fl.LocalConfig(2, "steps", steps), n,
                    server_lr=1.0)
  p0 = {"w": jnp.ones(3)}
  part = np.array([1, 0, 1, 1], bool)
  key = jax.random.key(5)
  rnd = jax.jit(alg.round)
  s1, _ = rnd(alg.init(p0), small_data, fl.make_round_input(part, key, steps))
  # reference: round 1 has c = c_i = 0, so clients run plain SGD
  x = np.ones(3)
  dys, dcs = [], []
  for c in np.flatnonzero(part):
    nk = int(small_data.num_examples[c])
    xe = np.asarray(small_data.examples["x"][c])
    ye = np.asarray(small_data.examples["y"][c])
    w = x.copy()
    for s in range(steps):
      idx = np.asarray(jax.random.randint(
          jax.random.fold_in(jax.random.fold_in(key, c), s), (2,), 0, nk))
      w = w - lr * xe[idx].T @ (xe[idx] @ w - ye[idx]) / 2
    dys.append(w - x)
    dcs.append((x - w) / (steps * lr))
  np.testing.assert_allclose(s1.params["w"], x + np.mean(dys, 0), rtol=1e-5)
  np.testing.assert_allclose(s1.c["w"], np.sum(dcs, 0) / n, rtol=1e-5)
  np.testing.assert_allclose(s1.c_clients["w"][1], 0.0)
  np.testing.assert_allclose(s1.c_clients["w"][3], dcs[2], rtol=1e-5)
  # round 2 runs with the corrected gradients and stays finite
  s2, _ = rnd(s1, small_data, fl.make_round_input(part, key, steps))
  assert np.all(np.isfinite(np.asarray(s2.params["w"])))
