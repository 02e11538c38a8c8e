"""FAVANO, FedCompass and FedAST on the simulated clock, against their rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import federated as fl
from gradax.federated.fedast import redistribute


def _quad(params, batch):
  l = 0.5 * jnp.sum((params["x"] - batch["a"]) ** 2, -1)
  return jnp.sum(l * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def _clients(n, seed=0, scale=1.0):
  a = scale * np.random.default_rng(seed).normal(size=(n, 1, 2))
  return a.astype(np.float32), fl.as_client_data(
      {"a": a.astype(np.float32)}, np.ones(n, np.int32))


def _sgd(x, a, lr, steps):
  for _ in range(steps):
    x = x - lr * (x - a)
  return x


def test_favano_equal_speeds_is_fedavg():
  n, k = 5, 3
  _, data = _clients(n)
  local = fl.LocalConfig(1, "steps", k)
  # every client completes its K steps (3 x 0.3 s) within the 1 s period
  alg = fl.favano(_quad, optax.sgd(0.2), local,
                  fl.SpeedModel(jnp.full(n, 0.3), jnp.zeros(n)), period=1.0)
  x, trace = alg.run({"x": jnp.zeros(2)}, data, 4)
  np.testing.assert_array_equal(trace.steps, np.full((4, n), k))
  avg = fl.fedavg(_quad, optax.sgd(0.2), local, n)
  rnd = jax.jit(lambda s, key: avg.round(s, data, fl.make_round_input(
      np.ones(n, bool), key, k))[0])
  state = avg.init({"x": jnp.zeros(2)})
  for t in range(4):
    state = rnd(state, jax.random.key(t))
  np.testing.assert_allclose(x["x"], state.params["x"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reweight", [True, False])
def test_favano_partial_progress_and_reweighting(reweight):
  n, k, lr, period = 4, 4, 0.1, 1.0
  a, data = _clients(n, 1, 3.0)
  step_time = np.array([0.2, 0.3, 0.45, 1.5])   # completes 4, 3, 2, 0 steps
  alg = fl.favano(_quad, optax.sgd(lr), fl.LocalConfig(1, "steps", k),
                  fl.SpeedModel(jnp.asarray(step_time), jnp.zeros(n)),
                  period=period, server_lr=0.5, reweight=reweight)
  x, trace = alg.run({"x": jnp.zeros(2)}, data, 2)
  e1 = np.minimum(k, np.floor(period / step_time + 1e-9)).astype(int)
  np.testing.assert_array_equal(trace.steps[0], e1)
  want = np.zeros(2)
  for t in range(2):
    # round 2: everyone restarted at t=1 from x_1, same step counts
    c = np.where(e1 > 0, k / np.maximum(e1, 1) if reweight else 1.0, 0.0)
    deltas = np.stack([_sgd(want, a[i, 0], lr, e1[i]) - want
                       for i in range(n)])
    want = want + 0.5 / n * (c[:, None] * deltas).sum(0)
  np.testing.assert_allclose(x["x"], want, rtol=1e-5, atol=1e-6)


def test_fedcompass_groups_arrive_together():
  n, q_max = 6, 20
  a, data = _clients(n, 2)
  step_time = np.array([0.1, 0.12, 0.2, 0.25, 0.4, 0.5])
  alg = fl.fedcompass(_quad, optax.sgd(0.02), fl.LocalConfig(1), fl.SpeedModel(
      jnp.asarray(step_time), jnp.zeros(n)), max_local_steps=q_max)
  x, tr = alg.run({"x": jnp.zeros(2)}, data, 60)
  grouped = (tr.group >= 0) & ~tr.late
  assert grouped.sum() > 3 * n
  # Q_i = floor((T_g - now)/s_i): a member lands within one of its own
  # steps before the group's expected time (exact speeds here)
  gap = tr.expected_time[grouped] - tr.arrival_time[grouped]
  assert np.all(gap >= -1e-9)
  assert np.all(gap < step_time[tr.client[grouped]] + 1e-9)
  assert np.all((tr.local_steps[grouped] >= 4) &
                (tr.local_steps[grouped] <= int(1.2 * q_max)))
  # clients of different speeds share groups (the point of the scheduler)
  mixed = [len(set(tr.client[grouped & (tr.group == g)]))
           for g in np.unique(tr.group[grouped])]
  assert max(mixed) >= 3
  # first arrivals (no group yet) are applied one by one, groups together
  assert np.sum(tr.group < 0) == n and tr.update_size.max() >= 3
  assert tr.update_size.sum() <= len(tr.client)
  # with a = 0.5, alpha = 0.9 and weights 1/N it still heads to the mean optimum
  assert np.linalg.norm(np.asarray(x["x"]) - a[:, 0].mean(0)) < 0.5 * \
      np.linalg.norm(a[:, 0].mean(0))


def test_fedast_one_task_is_fedbuff():
  n = 5
  _, data = _clients(n, 3)
  sp = fl.SpeedModel(jnp.array([1.0, 1.3, 1.7, 2.9, 4.1]), jnp.zeros(n))
  local = fl.LocalConfig(1, "steps", 2)
  init, run = fl.fedbuff(_quad, optax.sgd(0.3), local, sp, concurrency=n,
                         buffer_size=2, server_lr=0.7, staleness_exponent=0.5)
  st, tr = jax.jit(lambda s: run(s, data, 15))(init({"x": jnp.zeros(2)},
                                                    data, 0))
  alg = fl.fedast([fl.AstTask(_quad, optax.sgd(0.3), local, data,
                              server_lr=0.7)], sp, concurrency=n,
                  buffer_sizes=[2], staleness_exponent=0.5)
  (x,), tr2 = alg.run([{"x": jnp.zeros(2)}], 15)
  np.testing.assert_allclose(tr2.clock, tr["clock"], rtol=1e-6)
  np.testing.assert_array_equal(tr2.staleness, tr["staleness"])
  assert tr2.staleness.max() >= 2                      # stale updates occur
  np.testing.assert_allclose(x["x"], st.params["x"], rtol=1e-5, atol=1e-6)


def test_fedast_allocation_rule():
  # chunks of 2 go to the task with the largest floor(R·v/Σv) − share
  assert redistribute([1.0, 3.0], 8, 2) == [2, 6]
  assert redistribute([1.0, 1.0, 2.0], 12, 1) == [3, 3, 6]
  n = 12
  _, d1 = _clients(n, 4)
  _, d2 = _clients(n, 5, 10.0)
  local = fl.LocalConfig(1, "steps", 2)
  tasks = [fl.AstTask(_quad, optax.sgd(0.2), local, d) for d in (d1, d2)]
  alg = fl.fedast(tasks, fl.tiered_speeds(n, seed=2), concurrency=6,
                  buffer_ratio=1, realloc_every=6, variance_window=4)
  _, tr = alg.run([{"x": jnp.zeros(2)}] * 2, 120, seed=1)
  assert np.all(tr.targets.sum(1) == 6) and tr.targets.min() >= 1
  assert len({tuple(t) for t in tr.targets}) > 1        # it reallocated
  counts = np.bincount(tr.task, minlength=2)
  assert counts.min() > 0


def test_async_bad_arguments():
  sp = fl.tiered_speeds(4)
  _, data = _clients(4)
  with pytest.raises(ValueError, match="period"):
    fl.favano(_quad, optax.sgd(0.1), fl.LocalConfig(1), sp, period=0.0)
  with pytest.raises(ValueError, match="clients_per_step"):
    fl.favano(_quad, optax.sgd(0.1), fl.LocalConfig(1), sp, 1.0,
              clients_per_step=5)
  with pytest.raises(ValueError, match="unit"):
    fl.fedcompass(_quad, optax.sgd(0.1), fl.LocalConfig(1, "epochs"), sp)
  with pytest.raises(ValueError, match="latest_time_factor"):
    fl.fedcompass(_quad, optax.sgd(0.1), fl.LocalConfig(1), sp,
                  latest_time_factor=1.0)
  task = fl.AstTask(_quad, optax.sgd(0.1), fl.LocalConfig(1), data)
  with pytest.raises(ValueError, match="active"):
    fl.fedast([task, task], sp, concurrency=3, active=[1, 1])
  with pytest.raises(ValueError, match="concurrency"):
    fl.fedast([task], sp, concurrency=5)
