"""DeMo (Decoupled Momentum): local momenta, DCT-chunk top-k, sign update.

Per parameter, on replica i, each step (ALGORITHMS.md §3.6):

    δ_i ← β·δ_i + lr·g_i                       (local momentum, never synced)
    q_i = TopK_k(DCT(δ_i))  per chunk            (wire values + chunk indices)
    δ_i ← δ_i − IDCT(q_i)                        (error feedback of what is sent)
    Q   = scatter-mean over replicas of all_gather(q_i)
    θ   ← θ(1 − lr·wd) − lr·sign(IDCT(Q))

The scatter-mean averages each coefficient over the replicas that selected
it (the reference's ``scatter_reduce(reduce="mean")``), not over all n.
The DCT and top-k come from :func:`gradax.distributed.dct_topk`; this module
adds the wire format, the gather, the scatter-mean and the sign step. Traffic
is an ``all_gather``, so it grows with n (§2.4).

Wire format: values as f32 (the reference) or bf16 (bitcast to ``uint16`` so
the bytes on the wire are the bytes claimed, ALGORITHMS.md §6.4); indices
within a chunk as ``uint8`` (chunks of <= 256 coefficients), ``uint16``
(<= 65536, e.g. 64x64) or ``int32``. The reference sends int64 indices and
f32 values. Only the sign of the decoded mean is used, so bf16 values cost
the update nothing but the rounding of the per-coefficient means.

``proportional_k``: the reference keeps ``topk`` coefficients in every chunk,
so the small 1-D chunks of biases and norms (64 coefficients against 4096 in
a 64x64 block) keep half their coefficients and dominate the bytes of small
models. With ``proportional_k=True`` a chunk of m coefficients keeps
ceil(topk·m / chunk²) (at least 1): every chunk is sent at the density of a
full 64x64 block.

Paper: Peng, Quesnelle, Kingma et al., "DeMo: Decoupled Momentum
Optimization", 2024, arXiv 2411.19870 (reference ``bloc97/DeMo``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


_VALUE_DTYPES = {"f32": (jnp.float32, jnp.uint32),
                 "bf16": (jnp.bfloat16, jnp.uint16)}


def _layout(shape, chunk: int) -> tuple[int, int]:
  # (chunks, coefficients per chunk) under dct_topk's layout (1-D or
  # rows x rest).
  shape = tuple(int(s) for s in shape)
  dims = (max(1, math.prod(shape)),) if len(shape) <= 1 else (
      shape[0], math.prod(shape[1:]))
  cs = [_dct.chunk_size(d, chunk) for d in dims]
  return math.prod(d // c for d, c in zip(dims, cs)), math.prod(cs)


def _chunk_numel(shape, chunk: int) -> int:
  return _layout(shape, chunk)[1]


def _leaf_k(shape, topk: int, chunk: int, proportional_k: bool) -> int:
  numel = _chunk_numel(shape, chunk)
  if proportional_k:
    return min(numel, max(1, -(-topk * numel // (chunk * chunk))))
  return min(topk, numel)


def _index_dtype(numel: int):
  # Smallest unsigned container for an index within a chunk.
  for dt in (jnp.uint8, jnp.uint16):
    if numel <= np.iinfo(dt).max + 1:
      return dt
  return jnp.int32


def demo_nbytes(params: Any, n: int, topk: int = 32, chunk: int = 64,
                value_dtype: str = "f32", proportional_k: bool = False
                ) -> float:
  """Per-device bytes of one DeMo step on ``n`` replicas (ring all_gather).

  Each device receives the payloads of the n − 1 others: per chunk, k values
  (``value_dtype``) and k indices (the smallest unsigned type that holds
  the chunk's coefficient count).
  """
  vsize = np.dtype(_VALUE_DTYPES[value_dtype][0]).itemsize
  per = 0
  for x in jax.tree.leaves(params):
    nchunks, numel = _layout(jnp.shape(x), chunk)
    k = _leaf_k(jnp.shape(x), topk, chunk, proportional_k)
    per += nchunks * k * (vsize + np.dtype(_index_dtype(numel)).itemsize)
  return float((n - 1) * per)


def scale_by_demo(
    learning_rate: optax.ScalarOrSchedule,
    compression_decay: float = 0.999,
    topk: int = 32,
    chunk: int = 64,
    weight_decay: float = 0.0,
    axis_name: str | None = None,
    value_dtype: str = "f32",
    proportional_k: bool = False,
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
    value_dtype: ``"f32"`` (the reference) or ``"bf16"`` for the values on
      the wire; error feedback subtracts the values as sent.
    proportional_k: keep ceil(topk·m/chunk²) coefficients in a chunk of m
      (see the module doc) instead of ``topk`` in every chunk.

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
  if value_dtype not in _VALUE_DTYPES:
    raise ValueError(f"value_dtype={value_dtype!r}; must be one of "
                     f"{sorted(_VALUE_DTYPES)}.")
  _dct.dct_topk(topk, chunk)   # validates topk and chunk
  vtype, carrier = _VALUE_DTYPES[value_dtype]
  lr_fn = learning_rate if callable(learning_rate) else (
      lambda _: learning_rate)

  def init(params):
    return DemoState(jnp.zeros((), jnp.int32), jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def leaf(g, d, p, lr):
    numel = _chunk_numel(p.shape, chunk)
    comp = _dct.dct_topk(_leaf_k(p.shape, topk, chunk, proportional_k), chunk)
    d = compression_decay * d + lr * g.astype(jnp.float32)
    payload, _ = comp.encode(d, (), None)
    # The wire format: rounded values (bitcast), narrow indices.
    wire = {"values": lax.bitcast_convert_type(
                payload["values"].astype(vtype), carrier),
            "indices": payload["indices"].astype(_index_dtype(numel))}
    sent = lambda w: {
        "values": lax.bitcast_convert_type(w["values"], vtype).astype(
            jnp.float32), "indices": w["indices"].astype(jnp.int32)}
    d = d - comp.decode(sent(wire), d.shape)
    if axis_name is not None:
      wire = jax.tree.map(
          lambda a: lax.all_gather(a, axis_name, axis=1, tiled=True), wire)
    vals, idx = sent(wire)["values"], sent(wire)["indices"]
    # Scatter-mean: divide each value by how many replicas chose its index.
    rows = jnp.arange(idx.shape[0])[:, None]
    counts = jnp.zeros((idx.shape[0], numel), jnp.float32).at[
        rows, idx].add(1.0)
    w = 1.0 / counts[rows, idx]
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
    value_dtype: str = "f32",
    proportional_k: bool = False,
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
    value_dtype: ``"f32"`` (reference) or ``"bf16"`` values on the wire.
    proportional_k: same coefficient density in every chunk (module doc).
    axis_name: the replica axis.
    microbatches: micro-batches per step.

  Returns:
    A ``TrainAlgorithm`` named ``"demo"``.

  Example:
    >>> alg = demo(loss, 1e-3, make_mesh("data=8"))
    >>> state = alg.init(params); state, m = alg.step(state, batch)
  """
  tx = scale_by_demo(learning_rate, compression_decay, topk, chunk,
                     weight_decay, axis_name, value_dtype, proportional_k)
  alg = data_parallel(loss_fn, tx, mesh, None, axis_name=axis_name,
                      microbatches=microbatches)
  n = mesh.shape[axis_name]
  return alg._replace(
      name="demo",
      bytes_per_step=lambda params: demo_nbytes(
          params, n, topk, chunk, value_dtype, proportional_k))
