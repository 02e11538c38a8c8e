"""MicroAdam against a plain NumPy reference of its rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import optimizers as gx
import importlib

ma = importlib.import_module("gradax.optimizers.microadam")


def bf16(x):
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)
                    .astype(jnp.float32))


def ref_quant(x, qb):
  """Per-block 4-bit min/max quantise-dequantise with bf16 min/max."""
  xb = x.reshape(-1, qb)
  lo, hi = bf16(xb.min(1)), bf16(xb.max(1))
  span = hi - lo
  inv = np.where(span > 0, 15.0 / np.where(span > 0, span, 1.0), 0.0)
  q = np.clip(np.round((xb - lo[:, None]) * inv[:, None]), 0, 15)
  return (lo[:, None] + q * (span / 15.0)[:, None]).reshape(-1)


def ref_microadam(grads, density, window, b1, b2, eps, block, qb):
  d = grads[0].size
  k = int(np.ceil(density * block))
  nb = d // block
  ef = np.zeros(d)
  buf = []  # (positions, values) newest last
  outs = []
  for t, g in enumerate(grads, start=1):
    a = g.reshape(-1) + ef
    ab = a.reshape(nb, block)
    top = np.argsort(-np.abs(ab), axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(ab, top, 1)
    res = ab.copy()
    np.put_along_axis(res, top, 0.0, 1)
    ef = ref_quant(res.reshape(-1), qb)
    pos = (np.arange(nb)[:, None] * block + top).reshape(-1)
    buf = (buf + [(pos, bf16(vals).reshape(-1))])[-window:]
    m, v = np.zeros(d), np.zeros(d)
    for age, (p, val) in enumerate(reversed(buf)):
      np.add.at(m, p, (1 - b1) * b1 ** age * val)
      np.add.at(v, p, (1 - b2) * b2 ** age * val ** 2)
    # Adam's bias correction at step t (the authors' kernel), not the window's weight.
    outs.append((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
  return outs


def test_quantize4_matches_reference_and_packs_two_per_byte():
  x = np.random.default_rng(0).normal(size=64).astype(np.float32)
  packed, lo, hi = ma.quantize4(jnp.asarray(x), 16)
  assert packed.dtype == jnp.uint8 and packed.shape == (32,)
  assert lo.dtype == jnp.bfloat16 and lo.shape == (4,)
  got = ma.dequantize4(packed, lo, hi, 16)
  np.testing.assert_allclose(got, ref_quant(x, 16), rtol=1e-6, atol=1e-6)
  # 4 bits: the error is at most half a step of each block's range.
  steps = (x.reshape(4, 16).max(1) - x.reshape(4, 16).min(1)) / 15
  assert np.all(np.abs(got - x).reshape(4, 16) <= steps[:, None] * 0.51 + 0.02)


def test_three_steps_match_reference_with_ring_wrap():
  rng = np.random.default_rng(1)
  grads = [rng.normal(size=(2, 8)).astype(np.float32) for _ in range(3)]
  kw = dict(density=0.5, window=2, b1=0.9, b2=0.99, eps=1e-8, block_size=4,
            quant_block_size=4)
  tx = gx.scale_by_microadam(**kw)
  state = tx.init(jnp.zeros((2, 8)))
  update = jax.jit(tx.update)
  want = ref_microadam(grads, 0.5, 2, 0.9, 0.99, 1e-8, 4, 4)
  for g, w in zip(grads, want):
    u, state = update(jnp.asarray(g), state)
    np.testing.assert_allclose(np.asarray(u).reshape(-1), w, rtol=2e-5,
                               atol=2e-6)
  assert int(state.count) == 3


def test_state_is_under_one_byte_per_param_on_a_4096_matrix():
  params = jnp.zeros((64, 64))
  state = gx.scale_by_microadam().init(params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  # EF 2048 B + 32 min/max pairs (128 B) + window 10 x 41 x (2+2) B + count.
  assert nbytes == 2048 + 128 + 10 * 41 * 4 + 4
  assert nbytes / params.size <= 1.0


@pytest.mark.parametrize("kw,name", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(window=0), "window"), (dict(block_size=40000), "block_size")])
def test_bad_input_names_the_argument(kw, name):
  with pytest.raises(ValueError, match=name):
    gx.microadam(1e-3, **kw)
