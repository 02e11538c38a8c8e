"""Error feedback around any compressor: EF14, EF21 and EControl.

Each transform compresses what a worker sends, keeps the worker-side memory
in its state, and (with ``axis_name``) averages the messages over the mesh
axis with :func:`gradax.distributed.compressed_pmean`. ALGORITHMS.md §2.2.

With ``axis_name``, ``update`` runs inside ``jax.shard_map`` over that axis
and each replica's state holds its own memory (error buffers, local
estimators). At the jit level the whole state then carries a leading replica
axis of size n, sharded ``P(axis_name)``
(``gradax.distributed.sharding.stack_replicas`` outside, ``local_view`` /
``replica_view`` inside; ``gradax.distributed.data_parallel`` with
``reducer=None`` does this). ``init`` may run inside or outside ``shard_map``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.distributed import collectives as _col
from gradax.distributed.compressors import Compressor
from gradax.optimizers._tree import check_range


# --------------------------------------------------------------------------
# helpers shared by the communicating transforms (1-bit Adam & co. import
# them from here).


def check_axis(axis_name: str | None, who: str) -> int:
  """Returns the axis size; a clear error when called outside shard_map."""
  return _col.axis_size(axis_name, who)


def pmean_init(x, compressor, axis_name, schedule):
  """compressed_pmean state, buildable inside or outside shard_map."""
  return _col.compressed_pmean_init(x, compressor, axis_name, schedule,
                                    allow_unbound=True)


def _pmean_schedule(compressor: Compressor, schedule: str,
                    axis_name: str | None) -> str:
  if axis_name is None and schedule == "auto" and not compressor.linear:
    return "all_gather"  # one replica: C(x) itself, no server re-compression
  return schedule


def _compress_mean(x, compressor, axis_name, pstate, schedule, seed):
  mean, local, pstate = _col.compressed_pmean(
      x, compressor, axis_name, pstate, schedule, seed=seed,
      return_local=True)
  return mean, local, pstate


def _f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _like(tree, ref):
  return jax.tree.map(lambda a, r: a.astype(r.dtype), tree, ref)


# --------------------------------------------------------------------------
# EF14


class ErrorFeedbackState(NamedTuple):
  """State of :func:`error_feedback`.

  Attributes:
    error: e_i, this replica's memory, f32 leaves like the params.
    pmean: :func:`compressed_pmean` state (server error, PRNG counter).
  """
  error: Any
  pmean: Any


def error_feedback(compressor: Compressor, axis_name: str | None = None,
                   schedule: str = "auto", seed: int = 0
                   ) -> optax.GradientTransformationExtraArgs:
  """EF14 error feedback: compress gradient plus memory, keep the residual.

  Per worker i with memory e_i (Seide et al. 2014; Karimireddy et al.,
  "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
  2019, arXiv 1901.09847)::

    p_i = g_i + e_i;   q_i = C(p_i);   e_i <- p_i - q_i
    output = mean_i q_i   (through compressed_pmean over axis_name)

  With the identity compressor it is exact data-parallel averaging.

  Args:
    compressor: any :class:`~gradax.distributed.Compressor`.
    axis_name: mesh axis to average over (inside ``jax.shard_map``), or None
      for one replica.
    schedule: ``compressed_pmean`` schedule (``"auto"``: psum for linear
      compressors, two-phase otherwise; all_gather-free C(x) when
      ``axis_name`` is None).
    seed: seed of the compressor's randomness.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(error_feedback(gradax.distributed.scaled_sign()),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
  """
  sched = _pmean_schedule(compressor, schedule, axis_name)

  def init_fn(params):
    zeros = _f32(jax.tree.map(jnp.zeros_like, params))
    return ErrorFeedbackState(
        error=zeros, pmean=pmean_init(zeros, compressor, axis_name, sched))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    check_axis(axis_name, "error_feedback")
    e = state.error
    p = jax.tree.map(lambda g, ei: g.astype(jnp.float32) + ei, updates, e)
    mean, local, pstate = _compress_mean(p, compressor, axis_name,
                                         state.pmean, sched, seed)
    e = jax.tree.map(lambda a, b: a - b, p, local)
    return _like(mean, updates), ErrorFeedbackState(error=e, pmean=pstate)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# EF21


class EF21State(NamedTuple):
  """State of :func:`ef21`.

  Attributes:
    local: g_i, this replica's estimator, f32 leaves like the params.
    global_: g = mean_i g_i, identical on every replica.
    pmean: :func:`compressed_pmean` state.
  """
  local: Any
  global_: Any
  pmean: Any


def ef21(compressor: Compressor, axis_name: str | None = None,
         schedule: str = "auto", seed: int = 0
         ) -> optax.GradientTransformationExtraArgs:
  """EF21: compress the change of each worker's gradient estimator.

  Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically
  Better, and Practically Faster Error Feedback", 2021, arXiv 2106.05203::

    c_i = C(grad_i - g_i);   g_i <- g_i + c_i;   g <- g + mean_i c_i
    output = g

  Estimators start at zero on every worker, so g = mean_i g_i holds from the
  first step. Needs a contractive compressor (top-k, scaled sign, ...).

  Args:
    compressor: a :class:`~gradax.distributed.Compressor`.
    axis_name: mesh axis (inside ``jax.shard_map``) or None.
    schedule: ``compressed_pmean`` schedule.
    seed: seed of the compressor's randomness.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(ef21(gradax.distributed.top_k(100)), optax.sgd(0.1))
  """
  sched = _pmean_schedule(compressor, schedule, axis_name)

  def init_fn(params):
    zeros = _f32(jax.tree.map(jnp.zeros_like, params))
    return EF21State(local=zeros, global_=zeros,
                     pmean=pmean_init(zeros, compressor, axis_name, sched))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    check_axis(axis_name, "ef21")
    gi = state.local
    diff = jax.tree.map(lambda g, a: g.astype(jnp.float32) - a, updates, gi)
    mean, local, pstate = _compress_mean(diff, compressor, axis_name,
                                         state.pmean, sched, seed)
    gi = jax.tree.map(jnp.add, gi, local)
    g = jax.tree.map(jnp.add, state.global_, mean)
    return _like(g, updates), EF21State(local=gi, global_=g, pmean=pstate)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# EControl


class EControlState(NamedTuple):
  """State of :func:`econtrol`.

  Attributes:
    error: e_i, this replica's error, f32 leaves like the params.
    local: h_i, this replica's shift, f32 leaves like the params.
    global_: h = mean_i h_i, identical on every replica.
    pmean: :func:`compressed_pmean` state.
  """
  error: Any
  local: Any
  global_: Any
  pmean: Any


def econtrol(compressor: Compressor, eta: float = 1.0,
             axis_name: str | None = None, schedule: str = "auto",
             seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """EControl: error feedback with a controlled error term and a shift.

  Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with
  Compression and Error Control", 2023, arXiv 2311.05645 (ALGORITHMS.md
  §2.2; its ordering is marked unverified there)::

    Delta_i = C(eta e_i + g_i - h_i)
    e_i <- e_i + g_i - h_i - Delta_i
    h_i <- h_i + Delta_i
    output = h + mean_i Delta_i;   h <- h + mean_i Delta_i

  One compressed message per step, like EF21.

  Args:
    compressor: a :class:`~gradax.distributed.Compressor`.
    eta: feedback strength, in (0, 1].
    axis_name: mesh axis (inside ``jax.shard_map``) or None.
    schedule: ``compressed_pmean`` schedule.
    seed: seed of the compressor's randomness.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(econtrol(gradax.distributed.top_k(100), eta=0.5),
    ...                  optax.sgd(0.1))
  """
  check_range("eta", eta, 0.0, 1.0, low_inclusive=False)
  sched = _pmean_schedule(compressor, schedule, axis_name)

  def init_fn(params):
    zeros = _f32(jax.tree.map(jnp.zeros_like, params))
    return EControlState(error=zeros, local=zeros, global_=zeros,
                         pmean=pmean_init(zeros, compressor, axis_name, sched))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    check_axis(axis_name, "econtrol")
    e, hi = state.error, state.local
    shift = jax.tree.map(lambda g, h: g.astype(jnp.float32) - h, updates, hi)
    msg = jax.tree.map(lambda ei, s: eta * ei + s, e, shift)
    mean, delta, pstate = _compress_mean(msg, compressor, axis_name,
                                         state.pmean, sched, seed)
    e = jax.tree.map(lambda ei, s, dl: ei + s - dl, e, shift, delta)
    hi = jax.tree.map(jnp.add, hi, delta)
    out = jax.tree.map(jnp.add, state.global_, mean)
    return _like(out, updates), EControlState(
        error=e, local=hi, global_=out, pmean=pstate)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
