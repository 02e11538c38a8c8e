"""Compressor properties: round trips, unbiasedness, contraction, bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import distributed as gd
from gradax.distributed import compressors as C


@functools.partial(jax.jit, static_argnums=(0,))
def _rt(comp, x, key=None):
  """Jitted encode + decode (one compile instead of many eager ops)."""
  payload, _ = comp.encode(x, comp.init(x.shape), key)
  return payload, comp.decode(payload, x.shape)


def _payload_bytes(payload):
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(payload))


ALL = {
    "identity": gd.identity(),
    "bf16": gd.cast("bf16"),
    "fp16": gd.cast("fp16"),
    "int8": gd.int8(block_size=64),
    "int4": gd.int_quantize(4, block_size=32),
    "int2": gd.int_quantize(2, block_size=32),
    "fixed_int8": gd.fixed_point(8),
    "fixed_int4": gd.fixed_point(4),
    "sign_l1": gd.scaled_sign("l1"),
    "sign_rms": gd.onebit(),
    "topk": gd.top_k(37),
    "randk": gd.rand_k(40),
    "qsgd": gd.qsgd(15, bucket_size=64),
    "terngrad": gd.terngrad(),
    "powersgd": gd.powersgd(3),
    "dct": gd.dct_topk(k=8, chunk=16),
}


CASES = [(n, (24, 20)) for n in sorted(ALL)] + [
    (n, (77,)) for n in ("int4", "int2", "sign_l1", "terngrad", "powersgd",
                         "dct", "qsgd", "fixed_int4")]


@pytest.mark.parametrize("name,shape", CASES)
def test_payload_nbytes_matches_payload(name, shape):
  comp = ALL[name]
  x = jax.random.normal(jax.random.key(0), shape)

  @jax.jit
  def roundtrip(x):
    payload, _ = comp.encode(x, comp.init(shape), jax.random.key(1))
    return payload, comp.decode(payload, shape)

  payload, y = roundtrip(x)
  assert _payload_bytes(payload) == comp.payload_nbytes(shape)
  for leaf in jax.tree.leaves(payload):
    # Integer containers or f32 scales/values only: never bf16 on the wire.
    assert leaf.dtype in (jnp.uint8, jnp.int8, jnp.uint16, jnp.int16,
                          jnp.int32, jnp.uint32, jnp.float32), leaf.dtype
  assert y.shape == shape and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))


def test_bit_packing_round_trip():
  rng = np.random.default_rng(0)
  bits = rng.integers(0, 2, size=101).astype(bool)
  packed = C.pack_bits(jnp.asarray(bits))
  assert packed.dtype == jnp.uint8 and packed.shape == (13,)
  np.testing.assert_array_equal(np.asarray(C.unpack_bits(packed, 101)), bits)
  for b in (2, 4, 8):
    codes = rng.integers(0, 1 << b, size=37).astype(np.uint8)
    p = C._pack_codes(jnp.asarray(codes), b)
    assert p.shape == (math.ceil(37 * b / 8),)
    np.testing.assert_array_equal(np.asarray(C._unpack_codes(p, b, 37)), codes)


def test_exact_round_trips():
  key = jax.random.key(3)
  x = jax.random.normal(key, (16, 32))
  # identity
  np.testing.assert_array_equal(_rt(gd.identity(), x)[1], x)
  # casts: exact for representable values
  for dt, jdt in (("bf16", jnp.bfloat16), ("fp16", jnp.float16)):
    xr = x.astype(jdt).astype(jnp.float32)
    comp = gd.cast(dt)
    p, y = _rt(comp, xr)
    assert p["bits"].dtype == jnp.uint16
    np.testing.assert_array_equal(y, xr)
  # int quantization: values on the code grid of each block
  for bits in (2, 4, 8):
    levels = (1 << (bits - 1)) - 1
    rng = np.random.default_rng(bits)
    codes = rng.integers(-levels, levels + 1, size=(8, 32))
    codes[:, 0] = levels  # each block's absmax sits on the top level
    scales = rng.uniform(0.5, 2.0, size=(8, 1))
    xq = jnp.asarray((codes * scales).reshape(-1), jnp.float32)
    comp = gd.int_quantize(bits, block_size=32)
    np.testing.assert_allclose(_rt(comp, xq)[1], xq, rtol=1e-6)
  # scaled sign: a vector s * (+-1)
  signs = jnp.where(jax.random.bernoulli(key, 0.5, (50,)), 1.0, -1.0)
  for comp in (gd.scaled_sign("l1"), gd.scaled_sign("rms")):
    np.testing.assert_allclose(_rt(comp, 0.7 * signs)[1], 0.7 * signs,
                               rtol=1e-6)
  # top-k: at most k non-zeros
  sparse = jnp.zeros(100).at[jnp.array([3, 50, 99])].set(
      jnp.array([1.0, -2.0, 3.0]))
  comp = gd.top_k(3)
  p, y = _rt(comp, sparse)
  assert p["indices"].dtype == jnp.int16
  np.testing.assert_array_equal(y, sparse)
  # rand-k with k = d keeps everything, scale 1
  comp = gd.rand_k(64)
  v = jax.random.normal(key, (64,))
  np.testing.assert_allclose(_rt(comp, v, jax.random.key(9))[1], v,
                             rtol=1e-6)
  # PowerSGD: a rank-r matrix is recovered by one power iteration
  u = jax.random.normal(jax.random.key(4), (24, 3))
  w = jax.random.normal(jax.random.key(5), (20, 3))
  m = u @ w.T
  comp = gd.powersgd(3)
  np.testing.assert_allclose(_rt(comp, m)[1], m, atol=1e-4)
  # DCT top-k with every coefficient kept is the identity (orthonormal DCT)
  comp = gd.dct_topk(k=64, chunk=8)
  np.testing.assert_allclose(_rt(comp, x)[1], x, atol=1e-5)


def test_fixed_point_rounds_to_the_unit_grid_and_clips():
  x = jnp.array([0.2, 0.7, -1.4, 2.5, 126.6, 300.0, -1e9, 3.0])
  for bits, levels in ((8, 127), (4, 7), (2, 1)):
    payload, y = _rt(gd.fixed_point(bits), x)
    expected = np.clip(np.round(np.asarray(x)), -levels, levels)
    np.testing.assert_array_equal(np.asarray(y), expected)
    assert set(payload) == {"codes"}          # no scale travels
    assert payload["codes"].nbytes == math.ceil(x.size * bits / 8)


def test_dct_matches_scipy_free_reference():
  # DCT-II, orthonormal: X_k = a_k sum_n x_n cos(pi (2n+1) k / 2N).
  from gradax.distributed.dct import chunk_size, dct_matrix
  n = 8
  x = np.random.default_rng(0).normal(size=n)
  ref = np.array([
      (np.sqrt(1 / n) if k == 0 else np.sqrt(2 / n)) *
      sum(x[i] * np.cos(np.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
      for k in range(n)])
  np.testing.assert_allclose(dct_matrix(n) @ x, ref, atol=1e-5)
  np.testing.assert_allclose(dct_matrix(n) @ dct_matrix(n).T, np.eye(n),
                             atol=1e-6)
  assert chunk_size(768, 64) == 64 and chunk_size(100, 64) == 50
  assert chunk_size(97, 64) == 1
  # one coefficient per chunk on a constant chunk: its DC term.
  comp = gd.dct_topk(k=1, chunk=4)
  x2 = jnp.ones((8, 8)) * jnp.arange(1.0, 3.0).repeat(4)[:, None]
  np.testing.assert_allclose(_rt(comp, x2)[1], x2, atol=1e-5)


@pytest.mark.parametrize("name", ["qsgd", "terngrad_noclip", "randk"])
def test_unbiased(name):
  comp = {"qsgd": gd.qsgd(3, bucket_size=16),
          "terngrad_noclip": gd.terngrad(clip_sigma=None),
          "randk": gd.rand_k(8)}[name]
  x = jax.random.normal(jax.random.key(11), (32,))
  n = 4000
  keys = jax.random.split(jax.random.key(12), n)

  @jax.jit
  def samples(keys):
    return jax.vmap(lambda k: comp.decode(comp.encode(x, (), k)[0], x.shape)
                    )(keys)

  s = np.asarray(samples(keys))
  mean, std = s.mean(0), s.std(0)
  # Not a no-op: the estimator is random.
  assert std.max() > 1e-3
  # Elements with |x_i| = s are deterministic (std 0): allow float error.
  z = np.abs(mean - np.asarray(x)) / (std / np.sqrt(n) + 1e-5)
  assert z.max() < 5.0, z.max()


def test_terngrad_clipping_and_biased_without_clip():
  x = jnp.zeros(200).at[0].set(100.0).at[1:].set(0.1)
  comp = gd.terngrad(clip_sigma=2.5)
  keys = jax.random.split(jax.random.key(0), 2000)
  s = jax.jit(jax.vmap(lambda k: _rt(comp, x, k)[1]))(keys)
  c = 2.5 * float(jnp.std(x))
  # E T(x) equals the clipped vector, not x.
  np.testing.assert_allclose(float(s[:, 0].mean()), c, rtol=1e-5)
  assert float(jnp.max(jnp.abs(s))) <= c * (1 + 1e-6)


def test_contraction():
  rng = np.random.default_rng(0)
  d, k = 200, 20
  topk = gd.top_k(k)
  sign = gd.scaled_sign("l1")
  xs = np.stack([rng.standard_t(df=2 + t % 3, size=d) for t in range(20)])
  xs = jnp.asarray(xs, jnp.float32)
  yts = jax.jit(jax.vmap(lambda x: _rt(topk, x)[1]))(xs)
  yss = jax.jit(jax.vmap(lambda x: _rt(sign, x)[1]))(xs)
  for x, yt, ys in zip(np.asarray(xs), np.asarray(yts), np.asarray(yss)):
    nx = float(np.sum(x * x))
    assert float(np.sum((yt - x) ** 2)) <= (1 - k / d) * nx * (1 + 1e-6)
    err = float(np.sum((ys - x) ** 2))
    delta = float(np.sum(np.abs(x))) ** 2 / (d * nx)
    assert delta >= 1 / d
    # Closed form: ||C(x)-x||^2 = (1 - ||x||_1^2 / (d ||x||^2)) ||x||^2.
    np.testing.assert_allclose(err, (1 - delta) * nx, rtol=1e-4)
  # top-k's bound is tight on a constant vector.
  x = jnp.ones(d)
  yt = _rt(topk, x)[1]
  np.testing.assert_allclose(float(jnp.sum((yt - x) ** 2)), (1 - k / d) * d)


def test_sign_of_zero_is_plus_one():
  comp = gd.onebit()
  y = _rt(comp, jnp.array([0.0, -1.0, 1.0, 0.0]))[1]
  assert list(np.sign(np.asarray(y))) == [1, -1, 1, 1]


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match=r"k=300 is larger than the tensor size 200"):
    gd.top_k(300).encode(jnp.ones(200), (), None)
  with pytest.raises(ValueError, match="k=300"):
    gd.top_k(300).payload_nbytes((200,))
  with pytest.raises(ValueError, match="k must be an integer"):
    gd.top_k(0)
  with pytest.raises(ValueError, match="k=300"):
    gd.rand_k(300).payload_nbytes((10, 20))
  with pytest.raises(ValueError, match=r"rank=9 is above the smallest dimension 8"):
    gd.powersgd(9).init((8, 50))
  with pytest.raises(ValueError, match="rank must be"):
    gd.powersgd(0)
  with pytest.raises(ValueError, match="bits must be one of 2, 4, 8; got 3"):
    gd.int_quantize(bits=3)
  with pytest.raises(ValueError, match="block_size"):
    gd.int8(block_size=0)
  with pytest.raises(ValueError, match="bits must be one of 2, 4, 8; got 16"):
    gd.fixed_point(16)
  with pytest.raises(ValueError, match=r"levels must be an integer in \[1, 127\]; got 200"):
    gd.qsgd(levels=200)
  with pytest.raises(ValueError, match="clip_sigma"):
    gd.terngrad(clip_sigma=-1.0)
  with pytest.raises(ValueError, match="dtype must be one of"):
    gd.cast("fp8")
  with pytest.raises(ValueError, match="scale must be"):
    gd.scaled_sign("l2")
  with pytest.raises(ValueError, match=r"k=100 is larger than the 64 coefficients"):
    gd.dct_topk(k=100, chunk=8).payload_nbytes((64, 64))
  assert gd.dct_topk(k=100, chunk=8, clamp_k=True).payload_nbytes((8, 8)) == \
      64 * 6
