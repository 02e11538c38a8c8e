"""DeMo and Just-One-Byte."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import distributed as gd
from gradax.distributed.comm_bytes import comm_bytes
from gradax.distributed.data_parallel import place_batch
from gradax.distributed.demo import demo, scale_by_demo
from gradax.distributed.just_one_byte import just_one_byte

N = 8


def loss(p, batch):
  return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def setup(linear_problem):
  return linear_problem(1, 16, 8, num_batches=4, batch_size=32)


def shard(batch, i):
  b = batch["x"].shape[0] // N
  return jax.tree.map(lambda a: a[i * b:(i + 1) * b], batch)


def dct_matrix(n):
  # Orthonormal DCT-II, written independently of gradax.distributed.dct.
  k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
  d[0] /= np.sqrt(2.0)
  return d


@pytest.mark.parametrize("schedule", [False, True])
def test_demo_with_every_coefficient_is_signum_of_mean_local_momentum(
    setup, schedule):
  mesh, params, batches = setup
  beta = 0.9
  # A schedule sees the step count: step t uses 0.01·0.5^t.
  lr_at = (lambda t: 0.01 * 0.5 ** t) if schedule else (lambda t: 0.01)
  # 16x8 weight in 8x8 chunks (64 coefficients), bias in one chunk of 8.
  alg = demo(loss, lr_at if schedule else 0.01, mesh, topk=64, chunk=8,
             compression_decay=beta)
  s = alg.init(params)
  p_ref = jax.tree.map(np.asarray, params)
  mom = [jax.tree.map(np.zeros_like, p_ref) for _ in range(N)]
  grad = jax.jit(jax.grad(loss))
  for t, batch in enumerate(batches):
    s, _ = alg.step(s, batch)
    lr = lr_at(t)
    for i in range(N):
      g = grad(p_ref, shard(batch, i))
      mom[i] = jax.tree.map(lambda m, g: beta * m + lr * np.asarray(g),
                            mom[i], g)
    mean = jax.tree.map(lambda *m: np.mean(m, axis=0), *mom)
    p_ref = jax.tree.map(lambda p, m: p - lr * np.sign(m), p_ref, mean)
    # Everything was transmitted: the error-feedback residual is empty.
    mom = [jax.tree.map(np.zeros_like, m) for m in mom]
  for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(x))) for x in
             jax.tree.leaves(s.opt_state.delta)) < 1e-6


def bf16_round(x):
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("value_dtype", ["f32", "bf16"])
def test_demo_top1_scatter_mean_and_error_feedback_match_numpy(value_dtype):
  mesh = gd.make_mesh("data=8")
  rng = np.random.default_rng(3)
  g = rng.normal(size=(N, 8)).astype(np.float32)
  lr = 0.1
  tx = scale_by_demo(lr, compression_decay=0.5, topk=1, chunk=8,
                     axis_name="data", value_dtype=value_dtype)
  wire = bf16_round if value_dtype == "bf16" else (lambda x: x)

  def per_replica(gi):
    p = {"v": jnp.zeros((8,))}
    u, st = tx.update({"v": gi[0]}, tx.init(p), p)
    return u["v"][None], st.delta["v"][None]

  f = jax.jit(jax.shard_map(per_replica, mesh=mesh,
                            in_specs=jax.sharding.PartitionSpec("data"),
                            out_specs=jax.sharding.PartitionSpec("data")))
  u, delta = f(jax.device_put(g, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data"))))
  u, delta = np.asarray(u), np.asarray(delta)
  D = dct_matrix(8)
  coef = (lr * g) @ D.T                                   # rows: replicas
  top = np.argmax(np.abs(coef), axis=1)
  sums, counts = np.zeros(8), np.zeros(8)
  for i in range(N):
    sums[top[i]] += wire(coef[i, top[i]])
    counts[top[i]] += 1
  mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
  expect_u = -lr * np.sign(D.T @ mean)
  for i in range(N):
    np.testing.assert_allclose(np.asarray(u[i]), expect_u, atol=1e-6)
    sent = np.zeros(8)
    sent[top[i]] = wire(coef[i, top[i]])
    np.testing.assert_allclose(np.asarray(delta[i]), lr * g[i] - D.T @ sent,
                               atol=1e-6)


def test_demo_bytes_are_an_all_gather_of_values_and_uint8_indices(setup):
  mesh, params, batches = setup
  alg = demo(loss, 0.01, mesh, topk=4, chunk=8)
  s = alg.init(params)
  cb = comm_bytes(alg.step.jitted(s), s, place_batch(batches[0], mesh))
  gathers = [c for c in cb.requested if c.op.startswith("all_gather")]
  # w: 2 chunks x 4 coefficients, b: 1 chunk x 4; f32 values + uint8
  # indices (a chunk has 64 coefficients).
  assert sum(c.operand_bytes for c in gathers) == (2 * 4 + 4) * (4 + 1)
  assert sum(c.wire_bytes for c in gathers) == alg.bytes_per_step(params)


def test_demo_bf16_values_and_proportional_k_bytes(setup):
  mesh, params, batches = setup
  alg = demo(loss, 0.01, mesh, topk=4, chunk=8, value_dtype="bf16",
             proportional_k=True)
  s = alg.init(params)
  cb = comm_bytes(alg.step.jitted(s), s, place_batch(batches[0], mesh))
  gathers = [c for c in cb.requested if c.op.startswith("all_gather")]
  assert {c.dtype for c in gathers} == {"uint16", "uint8"}
  # w: 2 full 8x8 chunks x 4; b: one chunk of 8 coefficients keeps
  # ceil(4 * 8 / 64) = 1. Each value 2 bytes (bf16 bits), each index 1.
  assert sum(c.operand_bytes for c in gathers) == (2 * 4 + 1) * (2 + 1)
  assert sum(c.wire_bytes for c in gathers) == alg.bytes_per_step(params)
  s, _ = alg.step(s, batches[0])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s))


def test_just_one_byte_replicas_stay_bit_identical_and_send_one_byte(setup):
  mesh, params, batches = setup
  alg = just_one_byte(loss, 2e-3, mesh, eps=1e-3, clip=64.0, seed=7)
  s = alg.init(params)
  first = float(loss(params, batches[0]))
  for t in range(6):
    s, m = alg.step(s, batches[t % 4])
  for leaf in jax.tree.leaves(s.params):
    host = np.asarray(leaf)
    for i in range(1, N):
      assert np.array_equal(host[0], host[i])
  assert not np.array_equal(np.asarray(s.params["w"])[0], params["w"])
  assert float(loss(alg.eval_params(s), batches[0])) < first
  cb = comm_bytes(alg.step.jitted(s), s, place_batch(batches[0], mesh))
  assert [(c.op, c.dtype, c.operand_bytes) for c in cb.requested] == [
      ("all_gather", "uint8", 1)]
  assert alg.bytes_per_step(params) == N - 1


def test_bad_hyperparameters_are_rejected(setup):
  mesh, _, _ = setup
  with pytest.raises(ValueError, match="compression_decay"):
    scale_by_demo(0.1, compression_decay=1.0)
  with pytest.raises(ValueError, match="value_dtype"):
    scale_by_demo(0.1, value_dtype="fp8")
  with pytest.raises(ValueError, match="eps"):
    just_one_byte(loss, 0.1, mesh, eps=0.0)
