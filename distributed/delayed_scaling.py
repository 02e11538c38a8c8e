"""Delayed-scaling integer reduction: int8 codes, no scales on the wire.

Absmax block quantization (:func:`gradax.distributed.int8`) sends an f32 scale
with every block because only the sender knows the block's max. With delayed
scaling the scale comes from the past instead: after each reduction every
replica holds the same mean m, so each can set the next round's step for a
block b of ``block_size`` elements to

    s_b ← headroom · max_{i∈b} |m_i| / L ,        L = 2^(bits−1) − 1

(a block whose mean rounded to zero keeps its step) without sending
anything. The next round sends
clip(round((x + e) / s), −L, L) as fixed-point codes through
``compressed_pmean``'s two-phase schedule, and the worker keeps what did not
fit (the rounding and any clipping) in its error-feedback buffer e, so values
that outgrow the step are delayed, not lost. A block that saturates on every
replica has mean L·s_b, so its step grows by ``headroom`` per round until it
fits.

The first round has no past: its step is ``initial_amax / L``. Err on the
large side; a too-large guess costs one coarse round, a too-small one costs
log_headroom(true / guess) saturated rounds (both are recovered by error
feedback). For a pseudo-gradient of H Adam-type steps of rate η, |Δ_i| ≲ H·η.

Per round and device the wire carries 2(n−1)/n · d bytes for int8 (ring
model), a quarter of an f32 all-reduce (up to padding d to n equal chunks):
DiLoCo with H=100 sends 400x fewer bytes per step than f32 data parallel.

References: delayed scaling from the previous iterations' amax as in FP8
training (Micikevicius et al., "FP8 Formats for Deep Learning", 2022,
arXiv 2209.05433); error feedback (Seide et al., 2014; Karimireddy et al.,
2019, arXiv 1901.09847); int8 DiLoCo pseudo-gradients (INTELLECT-1,
arXiv 2412.01152).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gradax.distributed import collectives
from gradax.distributed.compressors import _check_int, fixed_point
from gradax.distributed.data_parallel import Reducer, compressed_nbytes


class DelayedScalingState(NamedTuple):
  """One replica's state of :func:`delayed_scaling_reducer`.

  Attributes:
    step: (num_blocks,) f32 quantization step per block; the same on every
      replica (it is computed from the shared mean).
    error: (d,) f32 worker error feedback, or (0,) without it.
    pmean: the two-phase ``compressed_pmean`` state (server error, in units
      of the step).
  """
  step: jax.Array
  error: jax.Array
  pmean: Any


def _check(initial_amax, block_size, headroom):
  _check_int("block_size", block_size, 1)
  if not (isinstance(initial_amax, (int, float)) and math.isfinite(initial_amax)
          and initial_amax > 0):
    raise ValueError(
        f"initial_amax must be a finite number > 0 (a guess of the largest "
        f"|value| in the first round); got {initial_amax!r}.")
  if not (isinstance(headroom, (int, float)) and math.isfinite(headroom)
          and headroom >= 1):
    raise ValueError(
        f"headroom must be a finite number >= 1 (the step is headroom times "
        f"the last mean's max over L); got {headroom!r}.")


def delayed_scaling_reducer(initial_amax: float = 1.0, bits: int = 8,
                            block_size: int = 256, headroom: float = 4.0,
                            error_feedback: bool = True) -> Reducer:
  """A mean over replicas in ``bits``-bit codes whose scales are never sent.

  Round t on replica m, with the shared per-block step s (module docstring):

      y_m = (x_m + e_m) / s ;  m̄ = s · TwoPhaseMean(clip(round(y_m), −L, L))
      e_m ← x_m + e_m − s · clip(round(y_m), −L, L)
      s_b ← headroom · max_{i∈b} |m̄_i| / L

  The two-phase mean (all_to_all of codes, f32 average with server error,
  re-quantization, all_gather) is ``compressed_pmean`` with
  :func:`~gradax.distributed.fixed_point`; its server error is rescaled when
  the step changes. Non-finite inputs are sent as 0 (an integer code has no
  NaN), so the reducer's state stays finite; watch the loss for divergence.

  Args:
    initial_amax: the first round's guess of max |x| (> 0); the first step is
      ``initial_amax / L``. Later steps come from the data.
    bits: 2, 4 or 8 bits per element on the wire.
    block_size: elements sharing one step. Steps cost no bytes, so blocks can
      be small; they must still be large enough for the last mean's max to
      predict the next one.
    headroom: >= 1; the step is ``headroom`` times the last mean's max / L,
      leaving room for growth and for single replicas exceeding the mean
      (the mean of n noisy replicas is smaller than each). Saturation only
      grows the step when every replica saturates, so the default keeps
      room: on char_lm DiLoCo (8 replicas, H=10, 1200 steps) headroom 2
      ended at eval loss 1.561, 4 at 1.536 and 8 at 1.537 (f32: 1.548).
    error_feedback: keep the worker residual (recommended: it is what makes
      clipping harmless).

  Returns:
    A :class:`~gradax.distributed.Reducer` usable wherever a reducer or
    compressor is accepted (``data_parallel(reducer=...)``,
    ``diloco(compressor=...)``).

  Raises:
    ValueError: for bits outside {2, 4, 8}, block_size < 1, a non-positive or
      non-finite ``initial_amax``, or headroom < 1.

  Example:
    >>> red = delayed_scaling_reducer(initial_amax=100 * 1e-3)  # H · lr
    >>> alg = diloco(loss, optax.adamw(1e-3), mesh, 100, compressor=red)
  """
  comp = fixed_point(bits)   # validates bits
  _check(initial_amax, block_size, headroom)
  levels = (1 << (bits - 1)) - 1

  def blocks(d):
    return -(-d // block_size)

  def per_element(step, d):
    return jnp.repeat(step, block_size)[:d]

  def init(flat, axis_name):
    d = flat.shape[0]
    error = jnp.zeros((d if error_feedback else 0,), jnp.float32)
    if axis_name is not None:
      error = collectives.as_varying(error, axis_name)
    return DelayedScalingState(
        step=jnp.full((blocks(d),), initial_amax / levels, jnp.float32),
        error=error,
        pmean=collectives.compressed_pmean_init(flat, comp, axis_name,
                                                "two_phase"))

  def reduce(flat, state, axis_name):
    d = flat.shape[0]
    step = per_element(state.step, d)
    target = flat + state.error if error_feedback else flat
    # An integer code cannot carry NaN/inf: such values are sent (and kept)
    # as 0, so the state stays finite and every replica gets the same mean.
    target = jnp.where(jnp.isfinite(target), target, 0.0)
    mean_codes, local_codes, pmean = collectives.compressed_pmean(
        target / step, comp, axis_name, state.pmean, "two_phase",
        return_local=True)
    mean = mean_codes * step
    error = target - local_codes * step if error_feedback else state.error

    amax = jnp.max(jnp.abs(jnp.pad(mean, (0, blocks(d) * block_size - d))
                           ).reshape(-1, block_size), axis=1)
    # A block that rounded to zero keeps its step (shrinking it would let an
    # idle block's step decay to nothing); its values wait in e until they
    # reach half a step.
    new_step = headroom * amax / levels
    new_step = jnp.where(jnp.isfinite(new_step) & (new_step > 0), new_step,
                         state.step)
    pmean = _rescale_server_error(pmean, state.step / new_step, d,
                                  per_element, axis_name)
    return mean, DelayedScalingState(new_step, error, pmean)

  def nbytes(d, n):
    return compressed_nbytes(comp, d, n, "two_phase")

  return Reducer(f"delayed_int{bits}", init, reduce, nbytes)


def _rescale_server_error(pmean, ratio, d, per_element, axis_name):
  """Server error (in old step units, this device's chunk) in new units."""
  err = pmean.server_error
  c = err.shape[0]
  if c == 0:
    return pmean
  full = jnp.pad(per_element(ratio, d), (0, max(0, c * _n(axis_name) - d)),
                 constant_values=1.0)
  r = 0 if axis_name is None else lax.axis_index(axis_name)
  return pmean._replace(
      server_error=err * lax.dynamic_slice_in_dim(full, r * c, c))


def _n(axis_name):
  return collectives.axis_size(axis_name, "delayed_scaling_reducer")
