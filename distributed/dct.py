"""DCT-chunk top-k compressor, as used by DeMo.

Peng, Quesnelle, Kingma et al., "DeMo: Decoupled Momentum Optimization",
2024, arXiv 2411.19870 (reference ``bloc97/DeMo``). ALGORITHMS.md §3.6.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from gradax.distributed import compressors as _c


@functools.lru_cache(maxsize=64)
def dct_matrix(n: int) -> np.ndarray:
  """Orthonormal DCT-II matrix D (n x n): coefficients are D @ x."""
  k = np.arange(n)[:, None]
  i = np.arange(n)[None, :]
  d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


def chunk_size(dim: int, target: int) -> int:
  """The largest divisor of ``dim`` that is at most ``target`` (DeMo's rule)."""
  best = 1
  for c in range(1, min(dim, target) + 1):
    if dim % c == 0:
      best = c
  return best


def dct_topk(k: int = 32, chunk: int = 64, clamp_k: bool = False
             ) -> _c.Compressor:
  """Chunked orthonormal DCT-II, then the top-k coefficients of each chunk.

  A tensor is viewed as 1-D (length L) or 2-D (rows x cols = shape[0] x rest).
  Each dimension is split into chunks whose size is the largest divisor not
  above ``chunk`` (so a matrix becomes 64x64 blocks), each block is
  transformed with C = D_r X D_c^T, and the k largest |C| per block are kept.
  Payload: values (f32) and in-block indices (int16 when a block has at most
  32768 coefficients). Decode scatters and applies the inverse DCT
  X = D_r^T C D_c. Biased; DeMo pairs it with momentum subtraction (EF) and
  the ``all_gather`` schedule.

  Args:
    k: coefficients kept per chunk (>= 1).
    chunk: target chunk length per dimension (>= 1); DeMo uses 64.
    clamp_k: if true, use min(k, chunk size) for small tensors instead of
      raising.

  Returns:
    A non-linear :class:`~gradax.distributed.Compressor`.

  Example:
    >>> comp = dct_topk(k=32, chunk=64)
    >>> payload, _ = comp.encode(delta, (), None)
  """
  _c._check_int("k", k, 1)
  _c._check_int("chunk", chunk, 1)

  def layout(shape):
    shape = tuple(int(s) for s in shape)
    if len(shape) <= 1:
      dims = (max(1, math.prod(shape)),)
    else:
      dims = (shape[0], math.prod(shape[1:]))
    cs = tuple(chunk_size(d, chunk) for d in dims)
    numel = math.prod(cs)
    kk = k
    if k > numel:
      if not clamp_k:
        raise ValueError(
            f"k={k} is larger than the {numel} coefficients of a DCT chunk of "
            f"shape {cs} for a tensor of shape {shape}; it must be in "
            f"[1, {numel}] (or pass clamp_k=True).")
      kk = numel
    nchunks = math.prod(d // c for d, c in zip(dims, cs))
    return dims, cs, kk, nchunks

  def to_blocks(x, dims, cs):
    if len(dims) == 1:
      return x.reshape(dims[0] // cs[0], cs[0])
    r, c = dims
    b = x.reshape(r // cs[0], cs[0], c // cs[1], cs[1]).transpose(0, 2, 1, 3)
    return b.reshape(-1, cs[0], cs[1])

  def from_blocks(b, dims, cs):
    if len(dims) == 1:
      return b.reshape(-1)
    r, c = dims
    b = b.reshape(r // cs[0], c // cs[1], cs[0], cs[1]).transpose(0, 2, 1, 3)
    return b.reshape(r, c)

  def transform(b, cs, inverse=False):
    ds = [jnp.asarray(dct_matrix(c)) for c in cs]
    if inverse:
      ds = [d.T for d in ds]
    if len(cs) == 1:
      return jnp.einsum("ij,bj->bi", ds[0], b, precision=lax.Precision.HIGHEST)
    return jnp.einsum("ij,bjk,lk->bil", ds[0], b, ds[1],
                      precision=lax.Precision.HIGHEST)

  def encode(x, state, key):
    del key
    dims, cs, kk, _ = layout(x.shape)
    coef = transform(to_blocks(x.astype(jnp.float32), dims, cs), cs)
    coef = coef.reshape(coef.shape[0], -1)
    _, idx = lax.top_k(jnp.abs(coef), kk)
    vals = jnp.take_along_axis(coef, idx, axis=1)
    return {"values": vals,
            "indices": idx.astype(_c._index_dtype(math.prod(cs)))}, state

  def decode(payload, shape):
    dims, cs, _, nchunks = layout(shape)
    idx = payload["indices"].astype(jnp.int32)
    coef = jnp.zeros((nchunks, math.prod(cs)), jnp.float32)
    coef = coef.at[jnp.arange(nchunks)[:, None], idx].add(payload["values"])
    blocks = transform(coef.reshape((nchunks,) + cs), cs, inverse=True)
    return from_blocks(blocks, dims, cs).reshape(shape)

  def nbytes(shape):
    _, cs, kk, nchunks = layout(shape)
    isz = np.dtype(_c._index_dtype(math.prod(cs))).itemsize
    return nchunks * kk * (4 + isz)

  return _c.Compressor(
      name=f"dct_top{k}", init=lambda shape: (), encode=encode, decode=decode,
      payload_nbytes=nbytes, linear=False)
