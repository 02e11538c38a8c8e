"""Robust aggregators, straggler policies, gradient coding, DBW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gradax import distributed as gd
from gradax.distributed import robust
from gradax.distributed import stragglers as st
from gradax.distributed.data_parallel import data_parallel


@pytest.fixture(scope="module")
def workers():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(40,)).astype(np.float32)
  honest = g + 0.05 * rng.normal(size=(7, 40)).astype(np.float32)
  bad = np.full((1, 40), 1e6, np.float32)
  return honest, np.concatenate([honest[:3], bad, honest[3:]])


@pytest.mark.parametrize("agg", [
    robust.coordinate_median(1), robust.trimmed_mean(1), robust.krum(1),
    robust.krum(1, num_selected=3), robust.flag_aggregator(1),
    robust.flag_aggregator(1, rank=2)], ids=lambda a: a.name)
def test_aggregators_ignore_one_worker_sending_1e6(workers, agg):
  honest, stacked = workers
  out = np.asarray(jax.jit(agg)(stacked))
  spread = np.max(np.abs(honest - honest.mean(0)))     # honest disagreement
  assert np.max(np.abs(out - honest.mean(0))) <= spread
  assert np.max(np.abs(stacked.mean(0) - honest.mean(0))) > 1e5


def test_trimmed_mean_and_krum_closed_forms():
  x = np.array([[1.0], [2.0], [3.0], [100.0], [-50.0]], np.float32)
  assert float(robust.trimmed_mean(1)(x)[0]) == pytest.approx(2.0)
  assert float(robust.coordinate_median(2)(x)[0]) == pytest.approx(2.0)
  pts = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]], np.float32)
  # f = 1: each score sums the n - f - 2 = 2 nearest squared distances;
  # worker 1 (at 1.0) has 1 + 1 = 2, the lowest.
  assert float(robust.krum(1)(pts)[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("agg, n", [
    (robust.coordinate_median(4), 8), (robust.trimmed_mean(4), 8),
    (robust.krum(3), 8), (robust.flag_aggregator(4), 8)])
def test_too_many_faulty_workers_is_rejected(agg, n):
  with pytest.raises(ValueError, match=f"num_faulty={agg.num_faulty}"):
    agg(np.zeros((n, 3), np.float32))
  with pytest.raises(ValueError, match="num_faulty"):
    robust.krum(-1)


def test_data_parallel_with_robust_reducer_ignores_a_corrupt_replica():
  mesh = gd.make_mesh("data=8")
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  y = x @ np.ones(4, np.float32)
  x_bad = x.copy()
  x_bad[6:8] *= 1e6                                 # replica 3's slice

  def loss(p, b):
    return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)

  alg = data_parallel(loss, optax.sgd(0.01), mesh,
                      reducer=robust.coordinate_median(1))
  s, _ = alg.step(alg.init({"w": w}), {"x": x_bad, "y": y})
  grads = [jax.grad(loss)({"w": w}, {"x": x[2 * i:2 * i + 2],
                                     "y": y[2 * i:2 * i + 2]})["w"]
           for i in range(8) if i != 3]
  lo, hi = np.min(grads, axis=0), np.max(grads, axis=0)
  step = (np.asarray(w) - np.asarray(s.params["w"])) / 0.01
  assert np.all(step >= lo - 1e-4) and np.all(step <= hi + 1e-4)


@pytest.mark.parametrize("n, s", [(8, 2), (5, 1), (6, 3)])
def test_gradient_code_recovers_exact_sum_with_s_missing(n, s):
  rng = np.random.default_rng(n + s)
  g = rng.normal(size=(n, 7))
  code = st.GradientCode(n, s, seed=1)
  coded = code.encode(g)
  for worker in range(n):       # each worker only touches its s+1 partitions
    assert set(np.nonzero(code.B[worker])[0]) <= set(code.support(worker))
  for trial in range(5):
    alive = np.ones(n, bool)
    alive[rng.choice(n, s, replace=False)] = False
    a = code.decode_weights(alive)
    assert np.all(a[~alive] == 0)
    np.testing.assert_allclose(a @ coded, g.sum(0), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="tolerates only"):
    dead = np.zeros(n, bool)
    dead[: s + 1] = True
    code.decode_weights(~dead)
  with pytest.raises(ValueError, match="num_stragglers"):
    st.GradientCode(n, n)


def test_gradient_code_decodes_in_a_masked_psum_on_the_mesh():
  mesh = gd.make_mesh("data=8")
  n, s = 8, 2
  rng = np.random.default_rng(5)
  g = rng.normal(size=(n, 6)).astype(np.float32)
  code = st.GradientCode(n, s)
  coded = code.encode(g).astype(np.float32)
  alive = np.ones(n, bool)
  alive[[1, 6]] = False
  a = code.decode_weights(alive)
  f = jax.jit(jax.shard_map(
      lambda c, w: st.weighted_psum(c[0], w[0], "data"), mesh=mesh,
      in_specs=(P("data"), P("data")), out_specs=P()))
  put = lambda v: jax.device_put(v, NamedSharding(mesh, P("data")))
  np.testing.assert_allclose(np.asarray(f(put(coded), put(a))), g.sum(0),
                             rtol=1e-4, atol=1e-4)


def test_weighted_pmean_drops_stragglers_and_fastest_waits_for_kth():
  mesh = gd.make_mesh("data=8")
  times = np.array([3.0, 1.0, 2.0, 9.0, 1.5, 4.0, 8.0, 2.5])
  w, wait = st.fastest(times, 5)
  assert wait == 3.0 and w.sum() == 5 and w[3] == 0 and w[6] == 0
  x = np.arange(8, dtype=np.float32)[:, None]
  f = jax.jit(jax.shard_map(
      lambda v, w: st.weighted_pmean(v[0], w[0], "data"), mesh=mesh,
      in_specs=(P("data"), P("data")), out_specs=P()))
  put = lambda v: jax.device_put(v, NamedSharding(mesh, P("data")))
  out = f(put(x), put(w))
  assert float(out[0]) == pytest.approx(float(x[w > 0].mean()))
  with pytest.raises(ValueError, match="k=0"):
    st.fastest(times, 0)


def test_time_model_is_seeded_and_validated():
  tm = st.TimeModel(6, "shifted_exponential", base=1.0, scale=0.5,
                    slow_prob=0.3, slow_factor=10.0, seed=3)
  np.testing.assert_array_equal(tm.sample(4), tm.sample(4))
  assert not np.array_equal(tm.sample(4), tm.sample(5))
  samples = np.stack([tm.sample(t) for t in range(400)])
  assert samples.min() >= 1.0
  # Slowdowns hit about 30% of worker-steps.
  assert 0.2 < np.mean(samples > 5.0) < 0.4
  het = st.TimeModel(3, "constant", speeds=(1.0, 2.0, 4.0))
  np.testing.assert_array_equal(het.sample(0), [1.0, 2.0, 4.0])
  with pytest.raises(ValueError, match="distribution"):
    st.TimeModel(4, "pareto")
  with pytest.raises(ValueError, match="slow_prob"):
    st.TimeModel(4, slow_prob=1.5)


def test_dbw_waits_for_few_when_gradient_dominates_and_many_when_noisy():
  n = 8
  times = np.arange(1.0, n + 1.0)          # k-th fastest arrives at time k
  signs = np.array([1.0, -1.0] * (n // 2))[:, None]
  e1 = np.array([1.0, 0.0, 0.0, 0.0])

  def grads(mean_sq, var):
    # Sample mean with squared norm mean_sq; deviations summing to zero with
    # unbiased per-worker variance var.
    c = np.sqrt(var * (n - 1) / n)
    return np.sqrt(mean_sq / 4) * np.ones(4) + c * signs * e1

  # lr = 0.1, L = 1. Gradient-dominated: |grad F|^2 ~ 4, var ~ 0:
  # gain(k) is flat in k, so the rate gain/E[T_k] peaks at k = 1.
  # Noise-dominated: |grad F|^2 = 13.5 - 100/8 = 1, var = 100:
  # rate(k) = (0.095 - 0.5/k)/k rises up to k = n.
  for g, expect in ((grads(4.0, 1e-6), 1), (grads(13.5, 100.0), n)):
    dbw = st.DynamicBackupWorkers(n, learning_rate=0.1, smoothness=1.0,
                                  ema=0.0)
    assert dbw.choose() == n // 2             # warm-up before statistics
    for t in range(3):
      dbw.observe(times, g, np.full(4, float(t)))
    assert dbw.choose() == expect
