"""PowerSGD: rank-r compression with warm start and orthogonalisation.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", 2019, arXiv 1905.13727.
ALGORITHMS.md §2.3.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from gradax.distributed import compressors as _c


def _orthonormalize(p):
  q, _ = jnp.linalg.qr(p)
  return q


def powersgd(rank: int = 4, seed: int = 0) -> _c.Compressor:
  """PowerSGD of rank r: one power iteration with a warm-started Q.

  The tensor is viewed as M in R^{rows x cols} (rows = shape[0]). With Q from
  the previous step (shared initial Q from ``seed``)::

    P = M Q;  all-reduce P (sum);  P = orth(P)
    Q = M^T P;  all-reduce Q (mean);  M_hat = P Q^T

  M enters linearly, so two ``psum`` calls are the whole reduction
  (``reduce``). The payload is P (rows x r) and Q (cols x r) in f32:
  4 r (rows + cols) bytes. 1-D tensors are sent uncompressed, as in PyTorch's
  DDP hook. PowerSGD is biased: wrap it in an error-feedback transform.

  Args:
    rank: r, >= 1 and at most min(rows, cols) of every 2-D+ tensor.
    seed: seed of the initial Q, identical on every worker.

  Returns:
    A linear :class:`~gradax.distributed.Compressor` whose state is ``{"q": Q}``.

  Example:
    >>> comp = powersgd(rank=4)
    >>> y, s = compressed_pmean(g, comp, "data", s, schedule="psum")
  """
  _c._check_int("rank", rank, 1)

  def dims(shape):
    if len(shape) < 2:
      return None
    rows, cols = int(shape[0]), int(math.prod(shape[1:]))
    if rank > min(rows, cols):
      raise ValueError(
          f"rank={rank} is above the smallest dimension {min(rows, cols)} of "
          f"the {rows}x{cols} matrix view of shape {tuple(shape)}; it must be "
          f"in [1, {min(rows, cols)}].")
    return rows, cols

  def init(shape):
    rc = dims(tuple(shape))
    if rc is None:
      return ()
    q = jax.random.normal(jax.random.key(seed), (rc[1], rank), jnp.float32)
    return {"q": _orthonormalize(q)}

  def _power(x, state, psum):
    shape = x.shape
    m = x.reshape(dims(shape)).astype(jnp.float32)
    q = _orthonormalize(state["q"])
    p = _orthonormalize(psum(m @ q))
    q = psum(m.T @ p, mean=True)
    return p, q

  def encode(x, state, key):
    del key
    if dims(x.shape) is None:
      return {"values": _c._flat(x)}, state
    p, q = _power(x, state, lambda a, mean=False: a)
    return {"p": p, "q": q}, {"q": q}

  def decode(payload, shape):
    if "values" in payload:
      return payload["values"].reshape(shape)
    return (payload["p"] @ payload["q"].T).reshape(shape)

  def reduce(x, state, key, axis_name):
    del key
    n = lax.axis_size(axis_name)
    if dims(x.shape) is None:
      return lax.psum(x.astype(jnp.float32), axis_name) / n, state

    def psum(a, mean=False):
      s = lax.psum(a, axis_name)
      return s / n if mean else s

    p, q = _power(x, state, psum)
    return (p @ q.T).reshape(x.shape), {"q": q}

  def nbytes(shape):
    rc = dims(tuple(shape))
    if rc is None:
      return 4 * math.prod(shape)
    return 4 * rank * (rc[0] + rc[1])

  return _c.Compressor(
      name=f"powersgd{rank}", init=init, encode=encode, decode=decode,
      payload_nbytes=nbytes, linear=True, reduce=reduce)
