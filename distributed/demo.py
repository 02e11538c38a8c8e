"""DeMo (Decoupled Momentum): local momenta, DCT-chunk top-k, sign update.

Per parameter, on replica i, each step (ALGORITHMS.md §3.6):

    δ_i ← β·δ_i + lr·g_i                       (local momentum, never synced)
    q_i = TopK_k(DCT(δ_i))  per chunk            (values + int16 indices)
    δ_i ← δ_i − IDCT(q_i)                        (error feedback)
    Q   = scatter-mean over replicas of all_gather(q_i)
    θ   ← θ(1 − lr·wd) − lr·sign(IDCT(Q))

The scatter-mean averages each coefficient over the replicas that selected
it (the reference's ``scatter_reduce(reduce="mean")``), not over all n.
The DCT and top-k come from :func:`gradax.distributed.dct_topk`; this module
adds the gather, the scatter-mean and the sign step. Traffic is an
``all_gather``, so it grows with n (§2.4).

Paper: Peng, Quesnelle, Kingma et al., "DeMo: Decoupled Momentum
Optimization", 2024, arXiv 2411.19870 (reference ``bloc97/DeMo``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from gradax.distributed import dct as _dct
from gradax.distributed.data_parallel import TrainAlgorithm, data_parallel


class DemoState(NamedTuple):
  """State of :func:`scale_by_demo` (per replica).

  Attributes:
    count: int32 step counter (for learning-rate schedules).
    delta: the local momentum δ, like the params (f32).
  """
  count: jax.Array
  delta: Any


def _chunk_numel(shape, chunk: int) -> int:
  # Coefficients per DCT chunk under dct_topk's layout (1-D or rows x rest).
  shape = tuple(int(s) for s in shape)
  dims = (max(1, math.prod(shape)),) if len(shape) <= 1 else (
      shape[0], math.prod(shape[1:]))
  return math.prod(_dct.chunk_size(d, chunk) for d in dims)


def demo_nbytes(params: Any, n: int, topk: int = 32, chunk: int = 64) -> float:
  """Per-device bytes of one DeMo step on ``n`` replicas (ring all_gather)."""
  comp = _dct.dct_topk(topk, chunk, clamp_k=True)
  per = sum(comp.payload_nbytes(jnp.shape(x)) for x in jax.tree.leaves(params))
  return float((n - 1) * per)


def scale_by_demo(
    learning_rate: optax.ScalarOrSchedule,
    compression_decay: float = 0.999,
    topk: int = 32,
    chunk: int = 64,
    weight_decay: float = 0.0,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
  """DeMo as an optax transformation that communicates over ``axis_name``.

  Update (see module doc): u = −lr·sign(IDCT(scatter-mean_i TopK(DCT(δ_i))))
  − lr·wd·θ, with δ_i the error-fed-back local momentum. The learning rate
  is inside δ, as in the reference.

  Args:
    learning_rate: lr (float or schedule).
    compression_decay: β in [0, 1) (0.999 in the paper).
    topk: coefficients kept per chunk (>= 1; clamped for small tensors).
    chunk: target DCT chunk length per dimension (64 in the paper).
    weight_decay: decoupled weight decay >= 0.
    axis_name: the replica axis (call inside ``shard_map``), or None.

  Returns:
    An optax ``GradientTransformation``; ``update`` needs ``params``. Its
    state is per replica (leading replica axis at the jit level).

  Example:
    >>> tx = scale_by_demo(4e-4, axis_name="data")
    >>> alg = data_parallel(loss, tx, mesh, reducer=None)
    >>> state = alg.init(params)
  """
  if not 0.0 <= compression_decay < 1.0:
    raise ValueError(
        f"compression_decay={compression_decay!r}; must be in [0, 1).")
  if weight_decay < 0:
    raise ValueError(f"weight_decay={weight_decay!r}; must be >= 0.")
  comp = _dct.dct_topk(topk, chunk, clamp_k=True)
  lr_fn = learning_rate if callable(learning_rate) else (
      lambda _: learning_rate)

  def init(params):
    return DemoState(jnp.zeros((), jnp.int32), jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def leaf(g, d, p, lr):
    d = compression_decay * d + lr * g.astype(jnp.float32)
    payload, _ = comp.encode(d, (), None)
    d = d - comp.decode(payload, d.shape)
    if axis_name is None:
      vals, idx = payload["values"], payload["indices"]
    else:
      gath = jax.tree.map(
          lambda a: lax.all_gather(a, axis_name, axis=1, tiled=True), payload)
      vals, idx = gath["values"], gath["indices"]
    # Scatter-mean: divide each value by how many replicas chose its index.
    numel = _chunk_numel(p.shape, chunk)
    rows = jnp.arange(idx.shape[0])[:, None]
    counts = jnp.zeros((idx.shape[0], numel), jnp.float32).at[
        rows, idx.astype(jnp.int32)].add(1.0)
    w = 1.0 / counts[rows, idx.astype(jnp.int32)]
    mean = comp.decode({"values": vals * w, "indices": idx}, p.shape)
    u = -lr * jnp.sign(mean)
    if weight_decay:
      u = u - lr * weight_decay * p.astype(jnp.float32)
    return u.astype(p.dtype), d

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_demo needs params (decoupled weight decay).")
    lr = lr_fn(state.count)
    out = jax.tree.map(lambda g, d, p: leaf(g, d, p, lr), updates, state.delta,
                       params)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2
    new_updates = jax.tree.map(lambda t: t[0], out, is_leaf=is_pair)
    new_delta = jax.tree.map(lambda t: t[1], out, is_leaf=is_pair)
    return new_updates, DemoState(state.count + 1, new_delta)

  return optax.GradientTransformation(init, update)


def demo(
    loss_fn: Callable[[Any, Any], jax.Array],
    learning_rate: optax.ScalarOrSchedule,
    mesh: Mesh,
    *,
    compression_decay: float = 0.999,
    topk: int = 32,
    chunk: int = 64,
    weight_decay: float = 0.0,
    axis_name: str = "data",
    microbatches: int = 1,
) -> TrainAlgorithm:
  """DeMo training on ``mesh``: :func:`scale_by_demo` in a data-parallel step.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    learning_rate: lr (4e-4 in the paper's OLMo runs).
    mesh: mesh with axis ``axis_name``.
    compression_decay: β (0.999).
    topk: coefficients per chunk (32).
    chunk: DCT chunk length (64).
    weight_decay: decoupled weight decay (0 in the paper).
    axis_name: the replica axis.
    microbatches: micro-batches per step.

  Returns:
    A ``TrainAlgorithm`` named ``"demo"``.

  Example:
    >>> alg = demo(loss, 1e-3, make_mesh("data=8"))
    >>> state = alg.init(params); state, m = alg.step(state, batch)
  """
  tx = scale_by_demo(learning_rate, compression_decay, topk, chunk,
                     weight_decay, axis_name)
  alg = data_parallel(loss_fn, tx, mesh, None, axis_name=axis_name,
                      microbatches=microbatches)
  n = mesh.shape[axis_name]
  return alg._replace(
      name="demo",
      bytes_per_step=lambda params: demo_nbytes(params, n, topk, chunk))
