"""1-bit Adam: Adam warm-up, then frozen variance and 1-bit momentum all-reduce.

Tang et al., "1-bit Adam: Communication Efficient Large-Scale Training with
Adam's Convergence Speed", ICML 2021, arXiv 2102.02888. Reference: DeepSpeed
<= 0.19.6 ``deepspeed/runtime/fp16/onebit/adam.py`` and
``deepspeed/runtime/comm/nccl.py`` (ALGORITHMS.md §1.3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradax.distributed import compressors as _comp
from gradax.optimizers import _onebit as _ob
from gradax.optimizers._onebit import onebit_bytes  # re-exported
from gradax.optimizers._tree import check_range
from gradax.optimizers.error_feedback import check_axis

__all__ = ["OnebitAdamState", "onebit_adam", "onebit_bytes",
           "scale_by_onebit_adam"]


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
  _ob.check_adam_args(b1, b2, eps, freeze_step)
  comp = _comp.onebit()
  bc2_frozen = 1.0 - b2 ** max(freeze_step, 1)

  def init_fn(params):
    return OnebitAdamState(**_ob.moments_state_init(params, comp, axis_name))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    n = check_axis(axis_name, "onebit_adam")
    g = _ob.to_f32(updates)
    t = optax.safe_int32_increment(state.count)

    def warmup(_):
      gm = _ob.data_mean(g, axis_name)
      mu, nu = _ob.ema(state.mu, gm, b1), _ob.ema_sq(state.nu, gm, b2)
      tf = t.astype(jnp.float32)
      c1, c2 = 1 - b1 ** tf, 1 - b2 ** tf
      u = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps),
                       mu, nu)
      return u, mu, nu, state.worker_error, state.pmean

    def compress(_):
      mean, we, pstate = _ob.onebit_allreduce(
          _ob.ema(state.mu, g, b1), state.worker_error, state.pmean, comp,
          axis_name)
      keep = _ob.live(state.nu)
      mu = _ob.where_live(keep, mean)
      u = _ob.where_live(keep, jax.tree.map(
          lambda m, v: m / (jnp.sqrt(v / bc2_frozen) + eps), mu, state.nu))
      return u, mu, state.nu, we, pstate

    u, mu, nu, we, pstate = lax.cond(t <= freeze_step, warmup, compress,
                                     None)
    sent = jnp.where(t <= freeze_step,
                     jnp.float32(onebit_bytes(g, n, False)),
                     jnp.float32(onebit_bytes(g, n, True, comp)))
    return _ob.cast_like(u, updates), OnebitAdamState(t, mu, nu, we, pstate,
                                                      sent)

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
