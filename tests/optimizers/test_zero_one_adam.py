"""0/1 Adam: exact early steps, variance-interval schedule, 1-bit synced
local steps on 8 replicas, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gradax import distributed as gd
from gradax.distributed import sharding as sh
from gradax.optimizers.zero_one_adam import zero_one_adam

N = 8


def test_first_steps_are_adam_without_bias_correction():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(6, 10)).astype(np.float32)
  lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-6, 0.1
  tx = zero_one_adam(lr, var_freeze_step=100, var_update_scaler=16, b1=b1,
                     b2=b2, eps=eps, weight_decay=wd)
  x = jnp.ones(10)
  st = tx.init(x)
  step = jax.jit(tx.update)
  m, v, xr = np.zeros(10), np.zeros(10), np.ones(10)
  for g in grads:
    u, st = step(jnp.asarray(g), st, x)
    x = x + u
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    xr = xr - lr * (m / (np.sqrt(v) + eps) + wd * xr)
  np.testing.assert_allclose(x, xr, rtol=1e-5, atol=1e-6)
  assert int(st.var_interval) == 1 and int(st.var_counter) == 6


def test_variance_interval_doubles():
  tx = zero_one_adam(0.01, var_freeze_step=1000, var_update_scaler=2)
  x = jnp.zeros(8)
  st = tx.init(x)
  step = jax.jit(tx.update)
  intervals = []
  for _ in range(14):
    _, st = step(jnp.ones(8), st, x)
    intervals.append(int(st.var_interval))
  # updates at t=1,2 (interval 1 -> 2), t=4,6 (-> 4), t=8,12 (-> 8).
  assert intervals == [1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 8, 8, 8]


def test_local_steps_sync_in_one_bit_on_8_replicas():
  mesh = gd.make_mesh("data=8")
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(N, 16, 6)).astype(np.float32)
  w_true = rng.normal(size=(6,)).astype(np.float32)
  ys = xs @ w_true
  tx = zero_one_adam(0.05, var_freeze_step=4, local_step_scaler=3,
                     local_step_clipper=4, axis_name="data")

  def loss(w, x, y):
    return jnp.mean((x @ w - y) ** 2)

  def run(w, st, x, y):
    w, st, x, y = w[0], sh.local_view(st), x[0], y[0]

    def step(c, _):
      w, st = c
      lval, g = jax.value_and_grad(loss)(w, x, y)
      u, st = tx.update(g, st, w)
      return (w + u, st), (w + u, st.comm_bytes, st.local_interval,
                           lax.pmean(lval, "data"))

    (w, st), hist = lax.scan(step, (w, st), None, length=24)
    return w[None], sh.replica_view(st), jax.tree.map(lambda a: a[None],
                                                      hist)

  f = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P("data"),
                            out_specs=P("data"), check_vma=False))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  w0 = put(jnp.zeros((N, 6)))
  st0 = put(sh.stack_replicas(tx.init(jnp.zeros(6)), N))
  _, _, (ws, sent, intervals, losses) = f(w0, st0, put(xs), put(ys))
  ws, sent = np.asarray(ws), np.asarray(sent)[0]
  intervals, losses = np.asarray(intervals)[0], np.asarray(losses)[0]
  # Stage 1: every step communicates; replicas share their parameters.
  for t in range(4):
    assert sent[t] > 0
    np.testing.assert_allclose(ws[:, t], ws[0:1, t].repeat(N, 0), atol=1e-6)
  # Stage 2: the interval grows 1 -> 2 -> 4 (clipped), local steps send 0.
  assert list(intervals[4:]) == [1, 1, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
                                 4, 4, 4, 4, 4]
  for t in range(4, 24):
    if sent[t] > 0:
      np.testing.assert_allclose(ws[:, t], ws[0:1, t].repeat(N, 0),
                                 atol=1e-5)
    else:
      assert not np.allclose(ws[0, t], ws[1, t])  # replicas drift locally
  assert (sent[4:] == 0).sum() >= 8
  assert losses[-1] < 0.5 * losses[0]


def test_bad_input():
  with pytest.raises(ValueError, match="local_step_clipper must be an integer >= 1"):
    zero_one_adam(local_step_clipper=0)
  with pytest.raises(ValueError, match="var_freeze_step must be an integer >= 0"):
    zero_one_adam(var_freeze_step=-1)
  with pytest.raises(ValueError, match="b2"):
    zero_one_adam(b2=1.0)
  tx = zero_one_adam(axis_name="data")
  with pytest.raises(ValueError, match="inside jax.shard_map"):
    tx.update(jnp.ones(4), tx.init(jnp.zeros(4)), jnp.zeros(4))
