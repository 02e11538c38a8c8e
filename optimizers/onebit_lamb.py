"""1-bit LAMB: LAMB warm-up, then 1-bit momentum with frozen LAMB coefficients.

Li et al., "1-bit LAMB: Communication Efficient Large-Scale Large-Batch
Training with LAMB's Convergence Speed", 2021, arXiv 2104.06069. Reference:
DeepSpeed <= 0.19.6 ``deepspeed/runtime/fp16/onebit/lamb.py``
(ALGORITHMS.md §1.3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradax.distributed import compressors as _comp
from gradax.optimizers import _onebit as _ob
from gradax.optimizers._tree import check_range
from gradax.optimizers.error_feedback import check_axis


class OnebitLambState(NamedTuple):
  """State of :func:`onebit_lamb`.

  Attributes:
    count: steps taken. shape=(), int32.
    mu: momentum, f32 like the params (identical on all replicas).
    nu: second moment, frozen after ``freeze_step``.
    nu_fresh: second moment re-estimated from the reconstructed gradient in
      the compression stage.
    coeff_freeze: per-tensor EMA of the LAMB trust ratio (warm-up), frozen.
    last_factor: per-tensor previous scaling factor (compression stage).
    scaling: per-tensor momentum scaling coefficient (set once, when
      compression starts).
    worker_error: this replica's worker error of the fused momentum, f32
      (total size,).
    pmean: ``compressed_pmean`` state of the fused momentum (server error).
    comm_bytes: per-device bytes sent by the last update. f32.
  """
  count: jax.Array
  mu: Any
  nu: Any
  nu_fresh: Any
  coeff_freeze: Any
  last_factor: Any
  scaling: Any
  worker_error: jax.Array
  pmean: Any
  comm_bytes: jax.Array


def onebit_lamb(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    freeze_step: int = 100_000,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    coeff_beta: float = 0.9,
    factor_max: float = 4.0,
    factor_min: float = 0.5,
    factor_threshold: float = 0.1,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """1-bit LAMB (DeepSpeed's ``OnebitLamb``) as one optax transform.

  Warm-up (t <= freeze_step), LAMB on the f32-averaged gradient, per tensor::

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
    u = m / (sqrt(v) + eps) + wd p;  r = clip(||p|| / ||u||, min, max)
    c <- coeff_beta c + (1 - coeff_beta) r   (when r != 1);  p <- p - lr r u

  Compression (t > freeze_step): every tensor's momentum is scaled by
  s_j = mean_k rms(m_k) / rms(m_j) (fixed at the first compressed step),
  all momenta are fused into one vector and averaged by the two-phase
  1-bit all-reduce (worker and server error), then unscaled. v stays
  frozen; v_fresh tracks the reconstructed gradient
  (m - b1 m_prev) / (1 - b1); the trust ratio is c * f with
  f = max(denom / denom_fresh) (mixed with 1 by the weight-decay share of
  the update), clipped to [factor_min, factor_max] and to
  (1 +- factor_threshold) of the previous f. No bias correction.
  Coordinates whose frozen v is exactly 0 (gradients that were always zero)
  keep zero momentum and get a zero update, as in :func:`onebit_adam`: the
  sign compressor cannot send a 0, and m / (sqrt(0) + eps) would turn its
  sign noise into a 1/eps step.

  Args:
    learning_rate: float or schedule.
    freeze_step: warm-up steps.
    b1, b2: moment decays in [0, 1).
    eps: > 0.
    weight_decay: >= 0.
    max_coeff, min_coeff: bounds of the warm-up trust ratio.
    coeff_beta: EMA decay of the frozen trust ratio, in [0, 1).
    factor_max, factor_min, factor_threshold: bounds of the compression-stage
      factor.
    axis_name: data-parallel axis (inside ``jax.shard_map``) or None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (needs ``params``).

  Example:
    >>> tx = onebit_lamb(1e-3, freeze_step=200, axis_name="data")
    >>> updates, state = tx.update(grads, state, params)  # in shard_map
  """
  _ob.check_adam_args(b1, b2, eps, freeze_step)
  check_range("weight_decay", weight_decay, 0.0, None)
  check_range("coeff_beta", coeff_beta, 0.0, 1.0, high_inclusive=False)
  check_range("min_coeff", min_coeff, 0.0, max_coeff)
  check_range("factor_min", factor_min, 0.0, factor_max)
  check_range("factor_threshold", factor_threshold, 0.0, 1.0)
  comp = _comp.onebit()
  lr_fn = _ob.schedule_fn(learning_rate)

  def init_fn(params):
    base = _ob.moments_state_init(params, comp, axis_name, fused=True)
    scalars = lambda v: jax.tree.map(lambda _: jnp.float32(v), params)
    return OnebitLambState(
        **base, nu_fresh=base["nu"], coeff_freeze=scalars(0.0),
        last_factor=scalars(1.0), scaling=scalars(1.0))

  def norm(x):
    return jnp.sqrt(jnp.sum(jnp.square(x)))

  def safe_div(a, b):
    return a / jnp.where(b > 0, b, 1.0)

  def update_fn(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError("onebit_lamb needs params in update(); got None.")
    n = check_axis(axis_name, "onebit_lamb")
    g, p32 = _ob.to_f32(updates), _ob.to_f32(params)
    t = optax.safe_int32_increment(state.count)
    lr = jnp.asarray(lr_fn(state.count), jnp.float32)

    def warmup(st):
      gm = _ob.data_mean(g, axis_name)
      mu, nu = _ob.ema(st.mu, gm, b1), _ob.ema_sq(st.nu, gm, b2)
      nu_fresh = jax.tree.map(lambda v, f: jnp.where(t == freeze_step, v, f),
                              nu, st.nu_fresh)

      def leaf(m, v, p, c):
        u = m / (jnp.sqrt(v) + eps) + weight_decay * p
        wn, un = norm(p), norm(u)
        r = jnp.where((wn > 0) & (un > 0),
                      jnp.clip(safe_div(wn, un), min_coeff, max_coeff), 1.0)
        c = jnp.where(r != 1.0, coeff_beta * c + (1 - coeff_beta) * r, c)
        return -lr * r * u, c

      out = jax.tree.map(leaf, mu, nu, p32, st.coeff_freeze)
      delta = jax.tree.map(lambda _, o: o[0], mu, out)
      coeff = jax.tree.map(lambda _, o: o[1], mu, out)
      return delta, st._replace(mu=mu, nu=nu, nu_fresh=nu_fresh,
                                coeff_freeze=coeff)

    def compress(st):
      first = t == freeze_step + 1
      rms = jax.tree.map(lambda m: norm(m) / jnp.sqrt(max(m.size, 1)), st.mu)
      leaves = jax.tree.leaves(rms)
      united = sum(leaves) / len(leaves)
      scaling = jax.tree.map(
          lambda r, s: jnp.where(first, jnp.where(r > 0, united / r, 1.0), s),
          rms, st.scaling)
      mloc = jax.tree.map(jnp.multiply, _ob.ema(st.mu, g, b1), scaling)
      mean, we, pst = _ob.onebit_allreduce(
          _ob.fuse(mloc), st.worker_error, st.pmean, comp, axis_name)
      mu = _ob.where_live(_ob.live(st.nu), jax.tree.map(
          jnp.divide, _ob.unfuse(mean, mloc), scaling))

      def leaf(m, m_prev, v, vf, p, c, last):
        g_rec = (m - b1 * m_prev) / (1 - b1)
        vf = b2 * vf + (1 - b2) * g_rec * g_rec
        denom = jnp.sqrt(v) + eps
        pre = m / denom  # 0 where v = 0: m is held at 0 there
        u = pre + weight_decay * p
        f = jnp.max(denom / (jnp.sqrt(vf) + eps))
        # The share of the update that is not weight decay; 1 when wd = 0
        # (DeepSpeed branches on wd > 0, which a traced wd cannot).
        un = norm(u)
        ratio = jnp.where(un > 0, jnp.minimum(1.0, safe_div(norm(pre), un)),
                          1.0)
        f = f * ratio + (1.0 - ratio)
        f = jnp.clip(f, factor_min, factor_max)
        f = jnp.clip(f, last * (1 - factor_threshold),
                     last * (1 + factor_threshold))
        return -lr * c * f * u, vf, f

      out = jax.tree.map(leaf, mu, st.mu, st.nu, st.nu_fresh, p32,
                         st.coeff_freeze, st.last_factor)
      pick = lambda i: jax.tree.map(lambda _, o: o[i], mu, out)
      return pick(0), st._replace(
          mu=mu, nu_fresh=pick(1), last_factor=pick(2), scaling=scaling,
          worker_error=we, pmean=pst)

    warm = t <= freeze_step
    delta, st = lax.cond(warm, warmup, compress, state)
    sent = jnp.where(
        warm, jnp.float32(_ob.onebit_bytes(g, n, False)),
        jnp.float32(_ob.onebit_bytes(
            jax.ShapeDtypeStruct((_ob.fused_size(g),), jnp.float32), n, True,
            comp)))
    return _ob.cast_like(delta, updates), st._replace(count=t,
                                                      comm_bytes=sent)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
