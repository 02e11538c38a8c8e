"""1-bit Adam: Adam warm-up, then frozen variance and 1-bit momentum all-reduce.

Tang et al., "1-bit Adam: Communication Efficient Large-Scale Training with
Adam's Convergence Speed", ICML 2021, arXiv 2102.02888. Reference: DeepSpeed
<= 0.19.6 ``deepspeed/runtime/fp16/onebit/adam.py`` and
``deepspeed/runtime/comm/nccl.py`` (ALGORITHMS.md §1.3).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradax.distributed import collectives as _col
from gradax.distributed import compressors as _comp
from gradax.optimizers.error_feedback import check_axis, pmean_init
from gradax.optimizers._tree import check_range


class OnebitAdamState(NamedTuple):
  """State of :func:`scale_by_onebit_adam`.

  Attributes:
    count: steps taken. shape=(), int32.
    mu: first moment m (identical on every replica), f32 like the params.
    nu: second moment v; frozen after ``freeze_step``, f32 like the params.
    worker_error: this replica's worker error (DeepSpeed's ``worker_error``),
      f32 like the params.
    pmean: ``compressed_pmean`` state; holds this replica's server error.
    comm_bytes: per-device bytes sent by the last update (ring model),
      shape=(), f32; the runner logs it.
  """
  count: jax.Array
  mu: Any
  nu: Any
  worker_error: Any
  pmean: Any
  comm_bytes: jax.Array


def _check_common(b1, b2, eps, freeze_step, freeze_name="freeze_step"):
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  check_range("eps", eps, 0.0, None, low_inclusive=False)
  if not isinstance(freeze_step, int) or isinstance(freeze_step, bool) or \
      freeze_step < 0:
    raise ValueError(f"{freeze_name} must be an integer >= 0; got "
                     f"{freeze_name}={freeze_step!r}.")


def onebit_bytes(params, n: int, compressed: bool,
                 compressor: _comp.Compressor | None = None) -> float:
  """Per-device ring-model bytes of one 1-bit Adam step on ``n`` replicas.

  Warm-up: an f32 all-reduce, 2(n-1)/n * 4d. Compression stage: per tensor,
  the two-phase 1-bit all-reduce sends 2(n-1) * (c/8 + 4) bytes, with chunk
  length c = ceil(d/n) rounded up to a multiple of 8.
  """
  comp = compressor or _comp.onebit()
  total = 0.0
  for leaf in jax.tree.leaves(params):
    d = max(1, math.prod(jnp.shape(leaf)))
    if n <= 1:
      continue
    if not compressed:
      total += 2 * (n - 1) / n * 4 * d
    else:
      c = _col._chunk_len(d, n, comp.chunk_multiple)  # pylint: disable=protected-access
      total += 2 * (n - 1) * comp.payload_nbytes((c,))
  return total


def scale_by_onebit_adam(
    freeze_step: int = 100_000,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by 1-bit Adam (no learning rate, no weight decay).

  Warm-up (t <= freeze_step), exact Adam on the f32-averaged gradient::

    g = pmean(g_i);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
    u = m_hat / (sqrt(v_hat) + eps)          (bias-corrected)

  Compression (t > freeze_step), v frozen, momentum communicated in 1 bit::

    m_i = b1 m + (1-b1) g_i;  b_i = m_i + e_i     (worker error e_i)
    m = TwoPhase1Bit(b_i) (server error per chunk); e_i <- b_i - C(b_i)
    u = m / (sqrt(v_frozen_hat) + eps)        (no bias correction on m)

  C(x) = (||x||_2 / sqrt(d)) sign+(x); the all-reduce is DeepSpeed's
  ``compressed_allreduce`` (``compressed_pmean(..., schedule="two_phase")``
  with :func:`gradax.distributed.onebit`). v_frozen_hat = v / (1 - b2^F) with
  F = freeze_step. Coordinates whose frozen v is exactly 0 (gradients that
  were always zero) get a zero update and zero momentum: the sign compressor
  cannot represent 0, and DeepSpeed needs ``exp_avg_mask`` for them.

  Args:
    freeze_step: warm-up steps of exact Adam (DeepSpeed: 15-25% of the run).
    b1: momentum decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: > 0, added to sqrt(v).
    axis_name: data-parallel mesh axis (``update`` inside ``jax.shard_map``)
      or None for one replica (compression is still simulated).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`OnebitAdamState`.

  Example:
    >>> tx = scale_by_onebit_adam(freeze_step=100, axis_name="data")
    >>> updates, state = tx.update(grads, state)   # inside shard_map
  """
  _check_common(b1, b2, eps, freeze_step)
  comp = _comp.onebit()
  bc2_frozen = 1.0 - b2 ** max(freeze_step, 1)

  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32),
                         params)
    return OnebitAdamState(
        count=jnp.zeros((), jnp.int32), mu=zeros, nu=zeros,
        worker_error=zeros,
        pmean=pmean_init(zeros, comp, axis_name, "two_phase"),
        comm_bytes=jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    n = check_axis(axis_name, "onebit_adam")
    g = jax.tree.map(lambda x: x.astype(jnp.float32), updates)
    t = optax.safe_int32_increment(state.count)

    def warmup(_):
      gm = g if axis_name is None else jax.tree.map(
          lambda x: lax.pmean(x, axis_name), g)
      mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, gm)
      nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, state.nu, gm)
      tf = t.astype(jnp.float32)
      c1, c2 = 1 - b1 ** tf, 1 - b2 ** tf
      u = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps),
                       mu, nu)
      return u, mu, nu, state.worker_error, state.pmean

    def compress(_):
      mloc = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, g)
      b = jax.tree.map(jnp.add, mloc, state.worker_error)
      mean, local, pstate = _col.compressed_pmean(
          b, comp, axis_name, state.pmean, "two_phase", return_local=True)
      we = jax.tree.map(jnp.subtract, b, local)
      live = jax.tree.map(lambda v: v > 0, state.nu)
      mu = jax.tree.map(lambda m, k: jnp.where(k, m, 0.0), mean, live)
      u = jax.tree.map(
          lambda m, v, k: jnp.where(k, m / (jnp.sqrt(v / bc2_frozen) + eps),
                                    0.0), mu, state.nu, live)
      return u, mu, state.nu, we, pstate

    u, mu, nu, we, pstate = lax.cond(t <= freeze_step, warmup, compress,
                                     None)
    sent = jnp.where(t <= freeze_step,
                     jnp.float32(onebit_bytes(g, n, False)),
                     jnp.float32(onebit_bytes(g, n, True, comp)))
    u = jax.tree.map(lambda x, r: x.astype(r.dtype), u, updates)
    return u, OnebitAdamState(t, mu, nu, we, pstate, sent)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def onebit_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    freeze_step: int = 100_000,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """1-bit Adam: :func:`scale_by_onebit_adam`, decoupled weight decay, lr.

  p <- p - lr (u + wd p), as DeepSpeed's ``OnebitAdam`` (defaults lr 1e-3,
  freeze_step 100000, betas (0.9, 0.999), eps 1e-8, wd 0). The whole state,
  worker and server errors included, is a pytree of arrays: orbax saves and
  restores it bit-identically (DeepSpeed resets the errors on reload).

  Args:
    learning_rate: a float or an optax schedule.
    freeze_step: warm-up steps of exact Adam before compression.
    b1: momentum decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: > 0.
    weight_decay: >= 0, decoupled (AdamW-style).
    axis_name: data-parallel mesh axis (inside ``jax.shard_map``) or None.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.onebit_adam(1e-3, freeze_step=300,
    ...                                    axis_name="data")
    >>> state = tx.init(params)
  """
  check_range("weight_decay", weight_decay, 0.0, None)
  return optax.chain(
      scale_by_onebit_adam(freeze_step, b1, b2, eps, axis_name),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
