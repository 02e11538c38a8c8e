"""Data-parallel step builder: reducers, self-communicating optimizers, and
the algorithm registry."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from gradax import distributed as gd
from gradax.distributed import algorithms
from gradax.distributed.comm_bytes import comm_bytes
from gradax.distributed.data_parallel import (
    compressed_reducer, data_parallel, place_batch)


def loss(p, batch):
  return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(4)
  params = {"w": jnp.asarray(rng.normal(size=(64, 4)), jnp.float32),
            "b": jnp.zeros((4,), jnp.float32)}
  batches = [{"x": rng.normal(size=(16, 64)).astype(np.float32),
              "y": rng.normal(size=(16, 4)).astype(np.float32)}
             for _ in range(3)]
  return gd.make_mesh("data=8"), params, batches


def test_exact_mean_equals_full_batch_optimizer(setup):
  mesh, params, batches = setup
  tx = optax.adamw(1e-2, weight_decay=0.1)
  alg = data_parallel(loss, tx, mesh)
  s = alg.init(params)
  p, o = params, tx.init(params)
  for b in batches:
    s, m = alg.step(s, b)
    ref_loss, g = jax.value_and_grad(loss)(p, b)
    u, o = tx.update(g, o, p)
    p = optax.apply_updates(p, u)
    assert float(m["loss"]) == pytest.approx(float(ref_loss), rel=1e-5)
  for a, r in zip(jax.tree.leaves(s.params), jax.tree.leaves(p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5,
                               atol=1e-6)
  cb = comm_bytes(alg.step.jitted(s), s, place_batch(batches[0], mesh))
  assert len(cb.compiled) == 1            # gradients and loss: one all-reduce
  assert cb.wire_bytes == pytest.approx(alg.bytes_per_step(params) + 2 * 7 / 8
                                        * 4)


def test_int8_reducer_is_close_to_the_mean_and_counts_its_bytes(setup):
  mesh, params, batches = setup
  exact = data_parallel(loss, optax.sgd(0.1), mesh)
  comp = data_parallel(loss, optax.sgd(0.1), mesh,
                       reducer=compressed_reducer(gd.int8(block_size=8)))
  se, sc = exact.init(params), comp.init(params)
  se, _ = exact.step(se, batches[0])
  sc, _ = comp.step(sc, batches[0])
  err = np.max(np.abs(np.asarray(se.params["w"]) - np.asarray(sc.params["w"])))
  # absmax int8 rounds to half a step, max|block|/254, once on the workers
  # and once on the server (whose input is the mean plus worker error).
  b = batches[0]
  g_rep = [jax.grad(loss)(params, jax.tree.map(lambda a: a[2 * i:2 * i + 2],
                                               b))["w"] for i in range(8)]
  g_max = max(float(jnp.max(jnp.abs(g))) for g in g_rep)
  g_mean = float(jnp.max(jnp.abs(sum(g_rep) / 8)))
  bound = 0.1 * (g_max / 254 + (g_mean + g_max / 254) / 254) * 1.01
  assert 0 < err <= bound
  cb = comm_bytes(comp.step.jitted(sc), sc, place_batch(batches[0], mesh))
  grad_bytes = sum(c.wire_bytes for c in cb.compiled
                   if c.op in ("all-to-all", "all-gather"))
  assert grad_bytes == pytest.approx(comp.bytes_per_step(params))
  assert comp.bytes_per_step(params) < exact.bytes_per_step(params) / 2


def sgd_that_communicates(lr, axis_name):
  """A tiny optimizer that averages its own gradients (counts its steps)."""

  def init(params):
    return jnp.zeros((), jnp.int32)

  def update(g, count, params=None):
    g = lax.pmean(g, axis_name)
    return jax.tree.map(lambda x: -lr * x, g), count + 1

  return optax.GradientTransformation(init, update)


def test_self_communicating_optimizer_keeps_per_replica_state(setup):
  mesh, params, batches = setup
  alg = data_parallel(loss, sgd_that_communicates(0.1, "data"), mesh,
                      reducer=None)
  ref = data_parallel(loss, optax.sgd(0.1), mesh)
  s, r = alg.init(params), ref.init(params)
  for b in batches:
    s, _ = alg.step(s, b)
    r, _ = ref.step(r, b)
  assert s.opt_state.shape == (8,)
  np.testing.assert_array_equal(np.asarray(s.opt_state), 3)
  np.testing.assert_allclose(np.asarray(s.params["w"]),
                             np.asarray(r.params["w"]), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="replicated plan"):
    data_parallel(loss, optax.sgd(0.1), mesh, reducer=None, plan=1)


def test_registry_builds_every_algorithm_with_one_interface(setup):
  mesh, params, _ = setup
  for name in algorithms.ALGORITHMS:
    kw = {"learning_rate": 0.1} if name in ("demo", "just_one_byte") else {}
    if name in ("local_sgd", "diloco", "streaming_diloco", "eager_diloco",
                "co2"):
      kw["sync_every"] = 4
    alg = algorithms.build(name, loss, optax.sgd(0.1), mesh, **kw)
    assert alg.name == name
    assert alg.bytes_per_step(params) >= 0
  assert algorithms.parse_reducer("krum:1").num_faulty == 1
  assert algorithms.parse_reducer("int8").name == "int8"
  with pytest.raises(ValueError, match="known algorithms"):
    algorithms.build("sync_sgd", loss, optax.sgd(0.1), mesh)
  with pytest.raises(ValueError, match="needs learning_rate"):
    algorithms.build("demo", loss, None, mesh)
  with pytest.raises(ValueError, match="reducer='median:x'"):
    algorithms.parse_reducer("median:x")
  with pytest.raises(ValueError, match="compressor='int3'"):
    algorithms.parse_compressor("int3")
