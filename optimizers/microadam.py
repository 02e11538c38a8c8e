"""MicroAdam: Adam statistics from a window of top-k sparse gradients.

Modoranu et al., `MicroAdam: Accurate Adaptive Optimization with Low Space
Overhead and Provable Convergence <https://arxiv.org/abs/2405.15593>`_,
NeurIPS 2024 (arXiv 2405.15593). Pure JAX; the reference needs CUDA kernels.
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.optimizers import _projection as proj


class MicroAdamState(NamedTuple):
  """State of :func:`scale_by_microadam`.

  Per leaf of ``d`` entries, split into ``nb`` top-k blocks of ``B`` entries
  (``d`` padded to ``nb·B``, then to a multiple of the quantisation block):

  Attributes:
    count: steps taken, shape ``()``, int32.
    ef: 4-bit error feedback, two codes per byte, ``(D/2,)`` uint8.
    ef_min: per quantisation block minimum ``δ``, bf16.
    ef_max: per quantisation block maximum ``Δ``, bf16.
    indices: ring buffer of the last ``window`` top-k positions inside their
      block, ``(window, nb, k)`` int16.
    values: the matching gradient values, ``(window, nb, k)`` bf16.
  """
  count: jax.Array
  ef: Any
  ef_min: Any
  ef_max: Any
  indices: Any
  values: Any


class _Layout(NamedTuple):
  d: int       # entries of the leaf
  block: int   # top-k block size B
  blocks: int  # nb
  k: int       # entries kept per block
  qblock: int  # quantisation block size
  padded: int  # D, a multiple of qblock (and even)


def layout(shape, density: float, block_size: int,
           quant_block_size: int) -> _Layout:
  """The block layout MicroAdam uses for a leaf of the given shape."""
  d = max(1, math.prod(shape))
  block = min(block_size, d + d % 2)
  blocks = -(-d // block)
  k = max(1, min(block, math.ceil(density * block)))
  qblock = min(quant_block_size, blocks * block)
  qblock += qblock % 2
  padded = -(-(blocks * block) // qblock) * qblock
  return _Layout(d, block, blocks, k, qblock, padded)


def quantize4(x: jax.Array, qblock: int):
  """Per-block 4-bit min/max quantisation, packed two codes per byte.

  Codes are ``round((x - δ)·15/(Δ - δ))`` with ``δ, Δ`` the block's min and
  max (stored in bf16; codes are computed against the stored values).

  Args:
    x: a flat f32 array whose size is a multiple of ``qblock`` (even).
    qblock: quantisation block size.

  Returns:
    ``(packed uint8 (size/2,), δ bf16 (blocks,), Δ bf16 (blocks,))``.
  """
  xb = x.reshape(-1, qblock)
  lo = jnp.min(xb, axis=1).astype(jnp.bfloat16)
  hi = jnp.max(xb, axis=1).astype(jnp.bfloat16)
  lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
  span = hi32 - lo32
  inv = jnp.where(span > 0, 15.0 / jnp.where(span > 0, span, 1.0), 0.0)
  q = jnp.clip(jnp.round((xb - lo32[:, None]) * inv[:, None]), 0, 15)
  q = q.astype(jnp.uint8).reshape(-1, 2)
  packed = q[:, 0] | (q[:, 1] << 4)
  return packed, lo, hi


def dequantize4(packed: jax.Array, lo: jax.Array, hi: jax.Array,
                qblock: int) -> jax.Array:
  """Inverse of :func:`quantize4`: ``δ + q·(Δ - δ)/15``, flat f32."""
  q = jnp.stack([packed & 15, packed >> 4], axis=1).reshape(-1, qblock)
  lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
  step = (hi32 - lo32) / 15.0
  return (lo32[:, None] + q.astype(jnp.float32) * step[:, None]).reshape(-1)


def scale_by_microadam(
    density: float = 0.01,
    window: int = 10,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = 4096,
    quant_block_size: int = 128,
) -> optax.GradientTransformationExtraArgs:
  r"""MicroAdam's update from a window of compressed sparse gradients.

  Per leaf, with a 4-bit error-feedback buffer ``e`` and a ring buffer of the
  last ``window`` sparse gradients ``(I_j, V_j)``:

  .. math::
    a = g + Q^{-1}(e),\quad (I_t, V_t) = \mathrm{TopK}_{block}(|a|),\quad
    e \leftarrow Q(a \odot 1_{\notin I_t}),\\
    m = \sum_{j} (1-\beta_1)\beta_1^{r_j} V_j,\quad
    v = \sum_{j} (1-\beta_2)\beta_2^{r_j} V_j^2,\quad
    u = \frac{m / (1-\beta_1^{t})}{\sqrt{v / (1-\beta_2^{t})} + \epsilon},

  where ``r_j`` is the age of slot ``j`` (0 for the newest), the sums run
  over the ``min(t, window)`` filled slots, and ``t`` is the step: Adam's bias
  correction, as in the authors' CUDA kernel (``ista-daslab-optimizers``),
  even though the window holds only the last ``window`` gradients. Top-k is taken per block of ``block_size`` entries
  (``k = ceil(density·B)``), so positions fit in int16 and values are bf16.

  Args:
    density: fraction of each block kept, in (0, 1].
    window: number ``m >= 1`` of sparse gradients kept.
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: Adam epsilon (>= 0).
    block_size: top-k block size, 2..32768.
    quant_block_size: entries per min/max pair of the error feedback (>= 2).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(scale_by_microadam(), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  proj.check_range("density", density, 0.0, 1.0, low_inclusive=False)
  proj.check_positive_int("window", window)
  proj.check_positive_int("block_size", block_size)
  proj.check_positive_int("quant_block_size", quant_block_size)
  if not 2 <= block_size <= 32768:
    raise ValueError(
        f"block_size must be in [2, 32768] (int16 positions), got "
        f"{block_size}.")
  if quant_block_size < 2:
    raise ValueError(
        f"quant_block_size must be >= 2, got {quant_block_size}.")
  proj.check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  proj.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  proj.check_range("eps", eps, 0.0, float("inf"))

  def lay(p):
    return layout(jnp.shape(p), float(density), block_size, quant_block_size)

  def init_fn(params):
    def leaf(p):
      lt = lay(p)
      nq = lt.padded // lt.qblock
      return (jnp.zeros((lt.padded // 2,), jnp.uint8),
              jnp.zeros((nq,), jnp.bfloat16), jnp.zeros((nq,), jnp.bfloat16),
              jnp.zeros((window, lt.blocks, lt.k), jnp.int16),
              jnp.zeros((window, lt.blocks, lt.k), jnp.bfloat16))
    leaves, treedef = jax.tree.flatten(params)
    cols = list(zip(*map(leaf, leaves))) if leaves else [[]] * 5
    return MicroAdamState(jnp.zeros([], jnp.int32),
                          *(treedef.unflatten(c) for c in cols))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = optax.safe_int32_increment(state.count)
    slot = state.count % window
    ages = (slot - jnp.arange(window)) % window
    filled = jnp.minimum(count, window)
    valid = ages < filled
    b1_ = jnp.asarray(b1, jnp.float32)
    b2_ = jnp.asarray(b2, jnp.float32)
    agesf = ages.astype(jnp.float32)
    w1 = jnp.where(valid, (1.0 - b1_) * b1_ ** agesf, 0.0)
    w2 = jnp.where(valid, (1.0 - b2_) * b2_ ** agesf, 0.0)
    # Adam's bias correction at the global step t, as in the authors' kernel
    # (ISTA-DASLab ``compute_microadam_update``: c = (1 - b) / (1 - b**t)).
    norm1 = 1.0 - b1_ ** count.astype(jnp.float32)
    norm2 = 1.0 - b2_ ** count.astype(jnp.float32)

    def leaf(i, g, ef, lo, hi, idx_buf, val_buf):
      del i
      lt = lay(g)
      flat = jnp.pad(g.astype(jnp.float32).reshape(-1),
                     (0, lt.padded - lt.d))
      a = flat + dequantize4(ef, lo, hi, lt.qblock)
      a_blocks = a[:lt.blocks * lt.block].reshape(lt.blocks, lt.block)
      _, top = jax.lax.top_k(jnp.abs(a_blocks), lt.k)
      vals = jnp.take_along_axis(a_blocks, top, axis=1)
      rows = jnp.arange(lt.blocks)[:, None]
      residual = a_blocks.at[rows, top].set(0.0).reshape(-1)
      residual = jnp.pad(residual, (0, lt.padded - residual.size))
      ef, lo, hi = quantize4(residual, lt.qblock)
      idx_buf = idx_buf.at[slot].set(top.astype(jnp.int16))
      val_buf = val_buf.at[slot].set(vals.astype(jnp.bfloat16))
      # Dense Adam statistics from the window (scatter-add of each slot).
      pos = (jnp.arange(lt.blocks)[None, :, None] * lt.block
             + idx_buf.astype(jnp.int32))
      v32 = val_buf.astype(jnp.float32)
      size = lt.blocks * lt.block
      m = jnp.zeros((size,)).at[pos.reshape(-1)].add(
          (w1[:, None, None] * v32).reshape(-1))
      v = jnp.zeros((size,)).at[pos.reshape(-1)].add(
          (w2[:, None, None] * jnp.square(v32)).reshape(-1))
      u = (m / norm1) / (jnp.sqrt(v / norm2) + eps)
      u = u[:lt.d].reshape(g.shape).astype(g.dtype)
      return u, ef, lo, hi, idx_buf, val_buf

    new_updates, fields = proj.map_leaves(
        leaf, updates, state.ef, state.ef_min, state.ef_max, state.indices,
        state.values)
    return new_updates, proj.keep_sharding(MicroAdamState(count, *fields),
                                           state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def microadam(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.01,
    window: int = 10,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = 4096,
    quant_block_size: int = 128,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MicroAdam optimizer (about 0.9 bytes of state per parameter).

  ``-lr * (MicroAdam update + weight_decay * params)``; see
  :func:`scale_by_microadam`. Modoranu et al., `MicroAdam
  <https://arxiv.org/abs/2405.15593>`_, 2024.

  Args:
    learning_rate: a scalar or schedule.
    density: fraction of each block kept, in (0, 1].
    window: sparse gradients kept (>= 1).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam epsilon.
    block_size: top-k block size.
    quant_block_size: error-feedback quantisation block size.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.microadam(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return optax.chain(
      scale_by_microadam(density=density, window=window, b1=b1, b2=b2,
                         eps=eps, block_size=block_size,
                         quant_block_size=quant_block_size),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
