"""1-bit Adam: warm-up equals AdamW, the compression stage equals a NumPy
transcription, 8 data-parallel replicas, bit-identical orbax restore,
optax compatibility, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax import lax

from gradax import distributed as gd
from gradax.distributed.data_parallel import data_parallel
from gradax.optimizers.onebit_adam import onebit_adam, onebit_bytes

N = 8


def _scan_run(tx, loss, x0, steps):
  st = tx.init(x0)

  def step(c, _):
    x, st = c
    u, st = tx.update(jax.grad(loss)(x), st, x)
    return (optax.apply_updates(x, u), st), None

  (x, st), _ = jax.jit(lambda c: lax.scan(step, c, None, length=steps))(
      (x0, st))
  return x, st


def test_warmup_equals_adamw_single_replica():
  loss = lambda x: jnp.sum((x - jnp.arange(6.0)) ** 2 * jnp.arange(1.0, 7.0))
  x0 = jnp.zeros(6)
  a, _ = _scan_run(onebit_adam(0.05, freeze_step=50, weight_decay=0.01),
                   loss, x0, 30)
  b, _ = _scan_run(optax.adamw(0.05, weight_decay=0.01), loss, x0, 30)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _numpy_onebit_adam(grads, lr, freeze, b1, b2, eps):
  """Single replica: Adam warm-up, then worker + server 1-bit compression."""
  d = grads.shape[1]
  m, v = np.zeros(d), np.zeros(d)
  we, se = np.zeros(d), np.zeros(d)   # n = 1: the server chunk is all of it
  x = np.zeros(d)

  def c(z):
    s = np.linalg.norm(z) / np.sqrt(z.size)
    return s * np.where(z >= 0, 1.0, -1.0)

  for t, g in enumerate(grads, start=1):
    if t <= freeze:
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    else:
      b = b1 * m + (1 - b1) * g + we
      q = c(b)
      we = b - q
      srv = q + se
      m = c(srv)
      se = srv - m
      u = m / (np.sqrt(v / (1 - b2 ** freeze)) + eps)
    x = x - lr * u
  return x, we, se


def test_compression_stage_matches_numpy_reference():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(25, 24)).astype(np.float32) + 0.3
  tx = onebit_adam(0.01, freeze_step=10, b1=0.9, b2=0.99, eps=1e-6)
  st = tx.init(jnp.zeros(24))
  step = jax.jit(tx.update)
  x = jnp.zeros(24)
  for g in grads:
    u, st = step(jnp.asarray(g), st, x)
    x = x + u
  ref_x, ref_we, ref_se = _numpy_onebit_adam(grads.astype(np.float64), 0.01,
                                             10, 0.9, 0.99, 1e-6)
  np.testing.assert_allclose(x, ref_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(st[0].worker_error, ref_we, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(st[0].pmean.server_error, ref_se, rtol=1e-4,
                             atol=1e-5)


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 16)).astype(np.float32)
  w = rng.normal(size=(16, 4)).astype(np.float32)
  batch = {"x": x, "y": x @ w + 0.1 * rng.normal(size=(64, 4)).astype(
      np.float32)}

  def loss(p, b):
    return jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)

  params = {"w": jnp.zeros((16, 4)), "b": jnp.zeros((4,)),
            "unused": jnp.ones((5,))}
  return loss, params, batch


@pytest.fixture(scope="module")
def dp_run():
  mesh = gd.make_mesh("data=8")
  loss, params, batch = _problem()
  alg = data_parallel(loss, onebit_adam(0.02, freeze_step=6,
                                        axis_name="data"), mesh, reducer=None)
  ref = data_parallel(loss, optax.adamw(0.02, weight_decay=0.0), mesh)
  s, r = alg.init(params), ref.init(params)
  hist = []
  for t in range(16):
    s, m = alg.step(s, batch)
    r, mr = ref.step(r, batch)
    hist.append((float(m["loss"]), float(mr["loss"]), s, r))
  return mesh, alg, params, batch, hist


def test_data_parallel_8_replicas(dp_run):
  _, _, params, _, hist = dp_run
  # Warm-up (6 steps): exactly data-parallel AdamW.
  s6, r6 = hist[5][2], hist[5][3]
  np.testing.assert_allclose(s6.params["w"], r6.params["w"], rtol=1e-5,
                             atol=1e-6)
  s = hist[-1][2]
  st = s.opt_state[0]
  # Momentum is the all-reduced value: identical on every replica; worker
  # errors are per replica and differ.
  mu = np.asarray(st.mu["w"])
  for r in range(1, N):
    np.testing.assert_array_equal(mu[r], mu[0])
  we = np.asarray(st.worker_error["w"])
  assert not np.allclose(we[0], we[1])
  # A parameter whose gradient is always zero never moves (no mask needed).
  np.testing.assert_array_equal(s.params["unused"], params["unused"])
  # Training still makes progress in the compression stage.
  assert hist[-1][0] < hist[6][0]
  # Bytes per step reported in the state, as the runner reads them.
  assert float(np.asarray(st.comm_bytes)[0]) == onebit_bytes(params, N, True)
  assert float(np.asarray(hist[3][2].opt_state[0].comm_bytes)[0]) == \
      onebit_bytes(params, N, False)
  assert onebit_bytes(params, N, False) > 2 * onebit_bytes(params, N, True)


def test_checkpoint_restore_is_bit_identical(dp_run, tmp_path):
  _, alg, _, batch, hist = dp_run
  s = hist[9][2]          # inside the compression stage: errors are non-zero
  assert float(jnp.abs(s.opt_state[0].pmean["w"].server_error).max()) > 0
  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "state"
  ckpt.save(path, s)
  ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, s)
  restored = ckpt.restore(path, target)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  s1, s2 = s, restored
  for _ in range(3):
    s1, _ = alg.step(s1, batch)
    s2, _ = alg.step(s2, batch)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input():
  with pytest.raises(ValueError, match=r"b1 must be in \[0.0, 1.0\); got b1=1.5"):
    onebit_adam(b1=1.5)
  with pytest.raises(ValueError, match="eps must be in"):
    onebit_adam(eps=0.0)
  with pytest.raises(ValueError, match="freeze_step must be an integer >= 0"):
    onebit_adam(freeze_step=-3)
  with pytest.raises(ValueError, match="weight_decay"):
    onebit_adam(weight_decay=-1.0)
  tx = onebit_adam(axis_name="data")
  st = tx.init(jnp.zeros(4))
  with pytest.raises(ValueError, match="inside jax.shard_map over the 'data' axis"):
    tx.update(jnp.ones(4), st, jnp.zeros(4))


# --------------------------------------------------------------------------
# optax compatibility battery (the checks listed for Shampoo), run over the
# 1-bit family and error feedback.

from gradax.optimizers.error_feedback import error_feedback  # noqa: E402
from gradax.optimizers.onebit_lamb import onebit_lamb  # noqa: E402
from gradax.optimizers.zero_one_adam import zero_one_adam  # noqa: E402

FACTORIES = {
    # name: (factory(lr), static args for inject_hyperparams, steps, tol)
    "onebit_adam": (lambda lr, **k: onebit_adam(lr, freeze_step=300, **k),
                    2000, 1e-2),
    "zero_one_adam": (lambda lr, **k: zero_one_adam(
        lr, var_freeze_step=300, local_step_scaler=100, **k), 2000, 3e-2),
    "onebit_lamb": (lambda lr, **k: onebit_lamb(lr, freeze_step=300, **k),
                    2000, 3e-2),
    "ef_sign_sgd": (lambda lr, **k: optax.chain(
        error_feedback(gd.scaled_sign("l1")), optax.sgd(lr)), 20000, 3e-2),
}
# onebit_lamb: lr 0.05, since LAMB's trust ratio ||x||/||u|| starts at 0 for
# x0 = 0 and at 0.01 the frozen coefficient leaves Rosenbrock at ~(0.3, 0.3).
LRS = {"onebit_adam": 0.03, "zero_one_adam": 0.03, "onebit_lamb": 0.05,
       "ef_sign_sgd": 0.002}
TARGETS = {
    "parabola": (lambda x: jnp.sum((x - jnp.array([1.0, -2.0, 3.0])) ** 2),
                 jnp.zeros(3), np.array([1.0, -2.0, 3.0])),
    "rosenbrock": (lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2,
                   jnp.zeros(2), np.array([1.0, 1.0])),
    "matrix": (lambda x: jnp.sum((x - jnp.array([[1.0, 2.0], [3.0, 4.0]]))
                                 ** 2), jnp.zeros((2, 2)),
               np.array([[1.0, 2.0], [3.0, 4.0]])),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_converges(name, target):
  make, steps, tol = FACTORIES[name]
  lr = LRS[name]
  if name == "ef_sign_sgd" and target != "rosenbrock":
    lr = 0.01
  loss, x0, xstar = TARGETS[target]
  x, _ = _scan_run(make(lr), loss, x0, steps)
  np.testing.assert_allclose(x, xstar, atol=tol)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_optax_contract(name):
  make = FACTORIES[name][0]
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  tx = make(0.1)
  st = tx.init(params)
  # jit without recompiling on the second step; unknown kwargs ignored.
  upd = jax.jit(tx.update)
  u1, st = upd(grads, st, params)
  u2, st = upd(grads, st, params)
  assert upd._cache_size() == 1  # pylint: disable=protected-access
  tx.update(grads, tx.init(params), params, some_unknown_arg=3)
  # bf16 params keep their dtype.
  pb = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  gb = jax.tree.map(lambda p: p.astype(jnp.bfloat16), grads)
  ub, _ = tx.update(gb, tx.init(pb), pb)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(ub))
  # MultiSteps: zeros on non-final micro-steps.
  ms = optax.MultiSteps(tx, every_k_schedule=4)
  mst = ms.init(params)
  u, mst = ms.update(grads, mst, params)
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(u))
  # chain and masked: the masked-out leaf passes through untouched.
  masked = optax.masked(tx, {"w": True, "b": False})
  mu, _ = masked.update(grads, masked.init(params), params)
  np.testing.assert_array_equal(mu["b"], grads["b"])
  np.testing.assert_array_equal(mu["w"], u1["w"])
  # A constant schedule equals the constant learning rate.
  us, _ = make(optax.constant_schedule(0.1)).update(
      grads, make(optax.constant_schedule(0.1)).init(params), params)
  for a, b in zip(jax.tree.leaves(us), jax.tree.leaves(u1)):
    np.testing.assert_array_equal(a, b)


INJECT = {
    "onebit_adam": (onebit_adam, dict(freeze_step=2), ("freeze_step",)),
    "zero_one_adam": (zero_one_adam, dict(var_freeze_step=2),
                      ("var_freeze_step", "var_update_scaler",
                       "local_step_scaler", "local_step_clipper")),
    "onebit_lamb": (onebit_lamb, dict(freeze_step=2, weight_decay=0.01),
                    ("freeze_step", "weight_decay")),
}


@pytest.mark.parametrize("name", sorted(INJECT))
def test_inject_hyperparams(name):
  factory, kw, static = INJECT[name]
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 6}
  direct = factory(0.05, **kw)
  injected = optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=0.05, **kw)
  s1, s2 = direct.init(params), injected.init(params)
  p1 = p2 = params
  for t in range(5):
    g = jax.tree.map(lambda p: jnp.sin(p + t), p1)
    u1, s1 = direct.update(g, s1, p1)
    u2, s2 = injected.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-4, atol=1e-5)
