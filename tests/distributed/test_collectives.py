"""compressed_pmean: agreement with the exact mean, DeepSpeed's 1-bit
all-reduce, replica agreement, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gradax import distributed as gd

N = 8


@pytest.fixture(scope="module")
def mesh():
  return gd.make_mesh("data=8")


def _put(mesh, x):
  return jax.device_put(x, NamedSharding(mesh, P("data")))


def _pmean_fn(mesh, comp, schedule, steps=1):
  """Jitted: per-device rows -> every device's estimate (stacked)."""

  def f(xs):
    x = xs[0]
    st = gd.compressed_pmean_init(x, comp, "data", schedule)

    def body(st, _):
      m, st = gd.compressed_pmean(x, comp, "data", st, schedule)
      return st, m

    return jax.lax.scan(body, st, None, length=steps)[1][None]

  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"),
                               out_specs=P("data")))


def _data(shape, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  common = jax.random.normal(k1, shape)
  return common[None] + 0.5 * jax.random.normal(k2, (N,) + shape)


# (compressor, schedule, bound(exact, xs) -> max allowed |est - exact|)
def _int8_bound(exact, xs):
  # worker and server rounding: each at most half a step of its block scale.
  return 2 * (float(jnp.max(jnp.abs(xs))) / 127 / 2) * 1.01 + 1e-6


CASES = {
    "identity_psum": (gd.identity(), "psum", lambda e, xs: 1e-5),
    "identity_two_phase": (gd.identity(), "two_phase", lambda e, xs: 1e-5),
    "fp16_psum": (gd.cast("fp16"), "psum",
                  lambda e, xs: 2e-3 * float(jnp.max(jnp.abs(xs))) * N),
    "bf16_all_gather": (gd.cast("bf16"), "all_gather",
                        lambda e, xs: 2 ** -8 * float(jnp.max(jnp.abs(xs)))),
    "int8_two_phase": (gd.int8(block_size=32), "two_phase", _int8_bound),
    "int8_all_gather": (gd.int8(block_size=32), "all_gather",
                        lambda e, xs: _int8_bound(e, xs) / 2),
    "topk_all_k_all_gather": (gd.top_k(96), "all_gather", lambda e, xs: 1e-5),
    "randk_full_psum": (gd.rand_k(96), "psum", lambda e, xs: 1e-4),
    "dct_all_coeffs": (gd.dct_topk(k=16, chunk=4), "all_gather",
                       lambda e, xs: 1e-4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_close_to_exact_mean(mesh, name):
  comp, schedule, bound = CASES[name]
  xs = _data((8, 12))
  out = np.asarray(_pmean_fn(mesh, comp, schedule)(_put(mesh, xs)))[:, 0]
  exact = np.asarray(xs.mean(0))
  # Every device holds the same estimate.
  for r in range(1, N):
    np.testing.assert_array_equal(out[r], out[0])
  err = float(np.max(np.abs(out[0] - exact)))
  assert err <= bound(exact, xs), (err, bound(exact, xs))


def test_powersgd_exact_on_low_rank_mean(mesh):
  # Worker i holds a_i U V^T: the mean is rank 2 and PowerSGD(2) recovers it.
  u = jax.random.normal(jax.random.key(1), (16, 2))
  v = jax.random.normal(jax.random.key(2), (12, 2))
  a = jnp.arange(1.0, N + 1.0)
  xs = a[:, None, None] * (u @ v.T)[None]
  out = np.asarray(_pmean_fn(mesh, gd.powersgd(2), "psum")(_put(mesh, xs)))
  np.testing.assert_allclose(out[0, 0], xs.mean(0), rtol=1e-4, atol=1e-4)


def test_unbiased_quantizers_in_pmean(mesh):
  # Averaged over many calls (fresh keys per call), the estimate converges
  # to the exact mean, within the CLT band.
  steps = 100
  for comp in (gd.qsgd(4, bucket_size=16), gd.terngrad(clip_sigma=None)):
    xs = _data((32,), seed=3)
    out = np.asarray(_pmean_fn(mesh, comp, "all_gather", steps)(
        _put(mesh, xs)))[0]
    exact = np.asarray(xs.mean(0))
    mean, std = out.mean(0), out.std(0)
    z = np.abs(mean - exact) / (std / np.sqrt(steps) + 1e-5)
    assert std.max() > 1e-3 and z.max() < 5.0, (comp.name, z.max())


def _deepspeed_compressed_allreduce(ms, worker_err, server_err):
  """NumPy transcription of DeepSpeed's NcclBackend.compressed_allreduce.

  ms: (n, d) each rank's buffer_m; worker_err (n, d); server_err (n, d/n).
  Returns the averaged buffer on each rank (n, d) and the new errors.
  """
  n, d = ms.shape
  c = d // n
  signs, scales = [], []
  worker_err = worker_err.copy()
  for r in range(n):
    buf = ms[r] + worker_err[r]
    scale = np.linalg.norm(buf) / np.sqrt(buf.size)
    sgn = np.where(buf >= 0, 1.0, -1.0)  # sign(x).add(1).bool(): x >= 0
    worker_err[r] = buf - scale * sgn
    signs.append(sgn.reshape(n, c))       # chunk j goes to rank j
    scales.append(scale)
  server_err = server_err.copy()
  srv_signs, srv_scales = [], []
  for r in range(n):
    comp = sum(signs[j][r] * (scales[j] / n) for j in range(n))
    comp = comp + server_err[r]
    s = np.linalg.norm(comp) / np.sqrt(comp.size)
    sgn = np.where(comp >= 0, 1.0, -1.0)
    server_err[r] = comp - s * sgn
    srv_signs.append(sgn)
    srv_scales.append(s)
  out = np.concatenate([srv_signs[r] * srv_scales[r] for r in range(n)])
  return np.broadcast_to(out, (n, d)), worker_err, server_err


def test_onebit_allreduce_matches_deepspeed_over_20_steps(mesh):
  d, steps = 256, 20
  comp = gd.onebit()

  def step(m, we, st):
    b = m[0] + we[0]
    mean, local, st = gd.compressed_pmean(b, comp, "data", st, "two_phase",
                                          return_local=True)
    return mean[None], (b - local)[None], st

  def init(m):
    return gd.compressed_pmean_init(m[0], comp, "data", "two_phase")

  spec = P("data")
  # The count is the same on every device; the server error is per device.
  sspec = gd.PmeanState(count=P(), compressor=P(), server_error=spec)
  init_fn = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=spec,
                                  out_specs=sspec))
  step_fn = jax.jit(jax.shard_map(step, mesh=mesh,
                                  in_specs=(spec, spec, sspec),
                                  out_specs=(spec, spec, sspec)))
  rng = np.random.default_rng(0)
  ms = rng.normal(size=(steps, N, d)).astype(np.float32)
  ms += rng.normal(size=(1, 1, d)).astype(np.float32)  # shared signal
  we_ref = np.zeros((N, d), np.float64)
  se_ref = np.zeros((N, d // N), np.float64)
  we = _put(mesh, jnp.zeros((N, d)))
  st = init_fn(_put(mesh, jnp.zeros((N, d))))
  assert st.server_error.shape == (N * (d // N),)
  for t in range(steps):
    out, we, st = step_fn(_put(mesh, jnp.asarray(ms[t])), we, st)
    ref, we_ref, se_ref = _deepspeed_compressed_allreduce(
        ms[t].astype(np.float64), we_ref, se_ref)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(we), we_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(st.server_error).reshape(N, -1),
                               se_ref, rtol=1e-4, atol=1e-4)


def test_pytree_and_single_replica():
  comp = gd.int8(block_size=16)
  x = {"a": jnp.linspace(-1, 1, 40), "b": jnp.ones((3, 5))}
  st = gd.compressed_pmean_init(x, comp, None)
  mean, local, st2 = jax.jit(functools.partial(
      gd.compressed_pmean, compressor=comp, axis_name=None,
      return_local=True))(x, state=st)
  assert jax.tree.structure(mean) == jax.tree.structure(x)
  np.testing.assert_allclose(mean["b"], x["b"], atol=1e-6)
  np.testing.assert_allclose(local["a"], x["a"], atol=1 / 127)
  assert int(st2["a"].count) == 1


def test_explicitly_sharded_tensor_single_replica():
  # Under an explicit mesh a compressor needs the whole tensor (one scale,
  # one bit vector): the result equals the unsharded one and keeps the
  # input's sharding.
  mesh = gd.make_mesh("model=8")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 16)).astype(np.float32)
  comp = gd.onebit()
  st = gd.compressed_pmean_init(jnp.asarray(x), comp, None, "two_phase")
  fn = jax.jit(functools.partial(gd.compressed_pmean, compressor=comp,
                                 axis_name=None, schedule="two_phase",
                                 return_local=True))
  want, want_local, _ = fn(jnp.asarray(x), state=st)
  # sign+(x) times the RMS of x (one replica, no server error yet).
  np.testing.assert_allclose(
      want, np.sqrt(np.mean(x * x)) * np.where(x >= 0, 1.0, -1.0), rtol=1e-6)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "model")))
    got, got_local, _ = fn(xs, state=st)
    assert jax.typeof(got) == jax.typeof(xs)
    assert jax.typeof(got_local) == jax.typeof(xs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(got_local), np.asarray(want_local))


def test_bad_input(mesh):
  x = jnp.ones(16)
  with pytest.raises(ValueError, match="inside jax.shard_map over the 'data' axis"):
    gd.compressed_pmean_init(x, gd.int8(), "data")
  st = gd.compressed_pmean_init(x, gd.int8(), None)
  with pytest.raises(ValueError, match="inside jax.shard_map"):
    gd.compressed_pmean(x, gd.int8(), "data", st)
  with pytest.raises(ValueError, match="schedule must be one of"):
    gd.compressed_pmean(x, gd.int8(), None, st, schedule="ring")
  with pytest.raises(ValueError, match="needs a linear compressor"):
    gd.compressed_pmean(x, gd.onebit(), None, st, schedule="psum")
