"""0/1 Adam: adaptive variance freezing plus 1-bit synchronised local steps.

Lu et al., "Maximizing Communication Efficiency for Large-scale Training via
0/1 Adam", ICLR 2023, arXiv 2202.06009. Reference: DeepSpeed <= 0.19.6
``deepspeed/runtime/fp16/onebit/zoadam.py`` (ALGORITHMS.md §1.3).
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


class ZeroOneAdamState(NamedTuple):
  """State of :func:`zero_one_adam`.

  Attributes:
    count: steps taken. shape=(), int32.
    mu, nu: Adam moments, f32 like the params (identical on all replicas
      after each synchronisation).
    var_interval: steps between variance updates (doubles every
      ``var_update_scaler`` updates). shape=(), int32.
    var_counter: variance updates since the interval last doubled. int32.
    local_interval: steps between synchronisations after the variance is
      frozen (doubles every ``local_step_scaler`` steps, at most
      ``local_step_clipper``). int32.
    local_counter: steps since the local interval last doubled. int32.
    lrs: sum of learning rates since the last synchronisation. f32.
    accumulator: u, the local parameter change since the last sync, f32.
    worker_error: this replica's worker error, f32 like the params.
    pmean: ``compressed_pmean`` state (this replica's server error).
    comm_bytes: per-device bytes sent by the last update. f32.
  """
  count: jax.Array
  mu: Any
  nu: Any
  var_interval: jax.Array
  var_counter: jax.Array
  local_interval: jax.Array
  local_counter: jax.Array
  lrs: jax.Array
  accumulator: Any
  worker_error: Any
  pmean: Any
  comm_bytes: jax.Array


def zero_one_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    var_freeze_step: int = 100_000,
    var_update_scaler: int = 16,
    local_step_scaler: int = 32_678,
    local_step_clipper: int = 16,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """0/1 Adam (DeepSpeed's ``ZeroOneAdam``), as one optax transform.

  Stage 1 (t <= var_freeze_step): on steps with t % var_interval == 0 the
  gradient is averaged in f32 and both moments update; on the other steps
  only the momentum updates, with the gradient averaged by the two-phase
  1-bit all-reduce (worker and server error). var_interval doubles after
  every ``var_update_scaler`` variance updates.

  Stage 2 (t > var_freeze_step), v frozen, local steps::

    m <- b1 m + (1-b1) g_i (local);  delta = -lr (m / (sqrt(v)+eps) + wd p)
    u <- u + delta;  lrs <- lrs + lr
    every local_interval steps:  U = OneBitAllReduce(u * (sqrt(v)+eps))
      p <- p - u + U / (sqrt(v)+eps);  m <- -U / lrs;  u <- 0;  lrs <- 0

  local_interval doubles every ``local_step_scaler`` steps up to
  ``local_step_clipper``. There is no bias correction (as DeepSpeed). With
  one replica nothing is compressed (DeepSpeed also skips it at world size
  1), so the rule reduces to Adam with a lazily updated variance.
  Needs ``params`` in ``update`` (weight decay and the sync correction).

  Args:
    learning_rate: float or schedule.
    var_freeze_step: last step that may update the variance.
    var_update_scaler: kappa, variance updates per interval doubling (>= 1).
    local_step_scaler: steps per local-interval doubling (>= 1).
    local_step_clipper: H, the largest local interval (>= 1).
    b1, b2: moment decays in [0, 1).
    eps: > 0.
    weight_decay: >= 0, decoupled.
    axis_name: data-parallel axis (inside ``jax.shard_map``) or None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state
    :class:`ZeroOneAdamState`).

  Example:
    >>> tx = zero_one_adam(1e-3, var_freeze_step=200, axis_name="data")
    >>> updates, state = tx.update(grads, state, params)  # in shard_map
  """
  _ob.check_adam_args(b1, b2, eps, var_freeze_step, "var_freeze_step")
  for name, v in (("var_update_scaler", var_update_scaler),
                  ("local_step_scaler", local_step_scaler),
                  ("local_step_clipper", local_step_clipper)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be an integer >= 1; got {name}={v!r}.")
  check_range("weight_decay", weight_decay, 0.0, None)
  comp = _comp.onebit()
  lr_fn = _ob.schedule_fn(learning_rate)
  i32 = lambda v: jnp.asarray(v, jnp.int32)

  def init_fn(params):
    base = _ob.moments_state_init(params, comp, axis_name)
    return ZeroOneAdamState(
        **base, var_interval=i32(1), var_counter=i32(0),
        local_interval=i32(1), local_counter=i32(0),
        lrs=jnp.zeros((), jnp.float32), accumulator=base["mu"])

  def update_fn(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError("zero_one_adam needs params in update(); got None.")
    n = check_axis(axis_name, "zero_one_adam")
    g, p32 = _ob.to_f32(updates), _ob.to_f32(params)
    t = optax.safe_int32_increment(state.count)
    lr = jnp.asarray(lr_fn(state.count), jnp.float32)
    full_b = _ob.onebit_bytes(g, n, False)
    bit_b = _ob.onebit_bytes(g, n, True, comp) if n > 1 else 0.0

    def onebit(x, st):
      if n == 1:  # one replica: nothing to send (DeepSpeed skips it too)
        return x, st.worker_error, st.pmean
      return _ob.onebit_allreduce(x, st.worker_error, st.pmean, comp,
                                  axis_name)

    def adam_dir(mu, nu):
      return jax.tree.map(
          lambda m, v, p: m / (jnp.sqrt(v) + eps) + weight_decay * p,
          mu, nu, p32)

    def stage1(st):
      def full(st):
        gm = _ob.data_mean(g, axis_name)
        return st._replace(mu=_ob.ema(st.mu, gm, b1),
                           nu=_ob.ema_sq(st.nu, gm, b2),
                           comm_bytes=jnp.float32(full_b))

      def bit(st):
        gm, we, pst = onebit(g, st)
        return st._replace(mu=_ob.ema(st.mu, gm, b1), worker_error=we,
                           pmean=pst,
                           comm_bytes=jnp.float32(bit_b))

      st = lax.cond(t % st.var_interval == 0, full, bit, st)
      delta = jax.tree.map(lambda d: -lr * d, adam_dir(st.mu, st.nu))
      hit = t % st.var_interval == 0
      vc = jnp.where(hit, st.var_counter + 1, st.var_counter)
      grow = vc == var_update_scaler
      st = st._replace(
          var_counter=jnp.where(grow, 0, vc),
          var_interval=jnp.where(grow, st.var_interval * 2, st.var_interval))
      return delta, st

    def stage2(st):
      mu = _ob.ema(st.mu, g, b1)
      delta = jax.tree.map(lambda d: -lr * d, adam_dir(mu, st.nu))
      acc = jax.tree.map(jnp.add, st.accumulator, delta)
      st = st._replace(mu=mu, accumulator=acc, lrs=st.lrs + lr,
                       comm_bytes=jnp.float32(0.0))

      def sync(args):
        delta, st = args
        denom = jax.tree.map(lambda v: jnp.sqrt(v) + eps, st.nu)
        scaled = jax.tree.map(jnp.multiply, st.accumulator, denom)
        avg, we, pst = onebit(scaled, st)
        delta = jax.tree.map(lambda d, u, a, q: d - u + a / q, delta,
                             st.accumulator, avg, denom)
        lrs = jnp.where(st.lrs > 0, st.lrs, 1.0)
        mu = jax.tree.map(lambda a: -a / lrs, avg)
        zeros = jax.tree.map(jnp.zeros_like, st.accumulator)
        return delta, st._replace(
            mu=mu, accumulator=zeros, lrs=jnp.zeros((), jnp.float32),
            worker_error=we, pmean=pst, comm_bytes=jnp.float32(bit_b))

      delta, st = lax.cond(t % st.local_interval == 0, sync, lambda a: a,
                           (delta, st))
      lc = st.local_counter + 1
      grow = lc == local_step_scaler
      st = st._replace(
          local_counter=jnp.where(grow, 0, lc),
          local_interval=jnp.where(
              grow, jnp.minimum(st.local_interval * 2, local_step_clipper),
              st.local_interval))
      return delta, st

    delta, st = lax.cond(t <= var_freeze_step, stage1, stage2, state)
    return _ob.cast_like(delta, updates), st._replace(count=t)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
