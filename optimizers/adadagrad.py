"""AdAdaGrad: an adaptive batch-size controller driven by the norm test.

Lau, Liu & Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
Gradient Methods", 2024, arXiv 2402.11215. The norm test is from Byrd,
Chin, Nocedal & Wu, "Sample size selection in optimization methods for machine
learning", 2012.

Train with `optax.adagrad` or :func:`adagrad_norm` (or any optimizer) and, every step, feed the
controller the per-example gradient statistics of the batch just used::

  ctrl = adadagrad_controller(eta=0.5, max_batch_size=4096)
  cstate = ctrl.init(initial_batch_size=32)
  loss, stats = per_example_grad_stats(loss_fn, params, batch)
  updates, opt_state = tx.update(stats.grad, opt_state, params)
  cstate = ctrl.update(cstate, stats)
  next_batch_size = int(cstate.batch_size)

The runner does this with ``--config.batch_size_controller=adadagrad``
(``adadagrad_eta``, ``max_batch_size``; see ``gradax.experiments.run``).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.optimizers import _tree


class ScaleByAdagradNormState(NamedTuple):
  """State of :func:`scale_by_adagrad_norm`."""

  sum_sq: jax.Array  # b_t^2, shape=(), float32


def scale_by_adagrad_norm(
    initial_accumulator_value: float = 1e-2,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGrad-Norm: one scalar step size from the accumulated gradient norms.

  .. math::
    b_t^2 = b_{t-1}^2 + \|g_t\|^2, \qquad u_t = g_t / b_t,

  with :math:`\|\cdot\|` over the whole pytree and :math:`b_0^2` =
  `initial_accumulator_value`. AdAdaGrad-Norm pairs it with
  :func:`adadagrad_controller`.

  Ward, Wu & Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
  landscapes", 2018, arXiv 1806.01811.

  Args:
    initial_accumulator_value: :math:`b_0^2 > 0`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = optax.chain(scale_by_adagrad_norm(), optax.scale(-0.1))
    updates, state = tx.update(grads, tx.init(params), params)
  """
  _tree.check_range("initial_accumulator_value", initial_accumulator_value,
                    0.0, low_inclusive=False)

  def init_fn(params):
    del params
    return ScaleByAdagradNormState(
        sum_sq=jnp.asarray(initial_accumulator_value, jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    sq = optax.tree.norm(
        jax.tree.map(lambda g: g.astype(jnp.float32), updates), squared=True)
    sum_sq = (state.sum_sq + sq).astype(jnp.float32)
    inv = jax.lax.rsqrt(sum_sq)
    new_updates = jax.tree.map(lambda g: (g * inv).astype(g.dtype), updates)
    return new_updates, ScaleByAdagradNormState(sum_sq=sum_sq)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adagrad_norm(
    learning_rate: optax.ScalarOrSchedule,
    initial_accumulator_value: float = 1e-2,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaGrad-Norm: :math:`x_{t+1} = x_t - \eta_t g_t / b_t` (see
  :func:`scale_by_adagrad_norm`).

  Ward, Wu & Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
  landscapes", 2018, arXiv 1806.01811.

  Args:
    learning_rate: a scalar or schedule :math:`\eta_t`.
    initial_accumulator_value: :math:`b_0^2 > 0`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = gradax.optimizers.adagrad_norm(0.5)
    updates, state = tx.update(grads, tx.init(params), params)
  """
  return optax.chain(
      scale_by_adagrad_norm(initial_accumulator_value),
      optax.scale_by_learning_rate(learning_rate),
  )


class GradStats(NamedTuple):
  """Per-example gradient statistics of one batch.

  Attributes:
    grad: the mean gradient :math:`\\bar g` (like params): use it for the step.
    variance: :math:`\\sum_j s_j^2`, the trace of the sample covariance of
      the per-example gradients (unbiased, divides by b-1), shape=(), float32.
    mean_sq_norm: :math:`\\|\\bar g\\|^2`, shape=(), float32.
    batch_size: b, shape=(), int32 (summed over replicas with `axis_name`).
  """

  grad: Any
  variance: jax.Array
  mean_sq_norm: jax.Array
  batch_size: jax.Array


def per_example_grad_stats(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    axis_name: str | None = None,
) -> tuple[jax.Array, GradStats]:
  r"""Mean loss, mean gradient and gradient variance from `vmap(grad)`.

  .. math::
    \bar g = \frac1b \sum_i g_i, \qquad
    \sum_j s_j^2 = \frac{1}{b-1}\Big(\sum_i \|g_i\|^2 - b\,\|\bar g\|^2\Big).

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar` mean loss; called on batches
      of one example.
    params: the parameters.
    batch: pytree of arrays with a leading example axis (b >= 2 overall).
    axis_name: inside `shard_map` over data-parallel replicas, the axis to
      sum the statistics over; None for one replica.

  Returns:
    `(loss, stats)`: the mean loss over the (global) batch and `GradStats`.

  Example::

    loss, stats = per_example_grad_stats(task.loss, params, batch)
    updates, opt_state = tx.update(stats.grad, opt_state, params)
  """

  def one(example):
    example = jax.tree.map(lambda x: jnp.expand_dims(x, 0), example)
    return jax.value_and_grad(loss_fn)(params, example)

  losses, grads = jax.vmap(one)(batch)
  b = jnp.asarray(losses.shape[0], jnp.float32)
  sum_loss = jnp.sum(losses.astype(jnp.float32))
  sum_g = jax.tree.map(lambda g: jnp.sum(g.astype(jnp.float32), axis=0), grads)
  sum_sq = optax.tree.sum(
      jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32))),
                   grads))
  if axis_name is not None:
    b, sum_loss, sum_g, sum_sq = jax.lax.psum(
        (b, sum_loss, sum_g, sum_sq), axis_name)
  mean = jax.tree.map(lambda s: s / b, sum_g)
  mean_sq = optax.tree.norm(mean, squared=True)
  variance = jnp.maximum(sum_sq - b * mean_sq, 0.0) / jnp.maximum(b - 1, 1.0)
  grad = jax.tree.map(lambda m, p: m.astype(jnp.asarray(p).dtype), mean,
                      params)
  stats = GradStats(grad=grad, variance=variance, mean_sq_norm=mean_sq,
                    batch_size=b.astype(jnp.int32))
  return sum_loss / b, stats


def norm_test(stats: GradStats, eta: float) -> tuple[jax.Array, jax.Array]:
  r"""The norm test and the smallest batch size that would pass it.

  The batch of size b passes when the estimated variance of its mean gradient
  is small against the gradient itself:

  .. math::
    \frac{\sum_j s_j^2}{b} \le \eta^2 \|\bar g\|^2, \qquad
    b^\star = \left\lceil \frac{\sum_j s_j^2}{\eta^2 \|\bar g\|^2}
      \right\rceil.

  Args:
    stats: from :func:`per_example_grad_stats`.
    eta: the test's tolerance :math:`\eta > 0` (larger allows more noise).

  Returns:
    `(passed, b_star)`: a bool scalar and an int32 scalar (`b_star` is
    2**31-1 when the mean gradient is zero but the variance is not).

  Example::

    passed, b_star = norm_test(stats, eta=0.5)
  """
  b = stats.batch_size.astype(jnp.float32)
  lhs = stats.variance / b
  rhs = jnp.asarray(eta, jnp.float32) ** 2 * stats.mean_sq_norm
  passed = lhs <= rhs
  big = jnp.float32(2**31 - 1)
  b_star = jnp.where(rhs > 0, jnp.ceil(stats.variance / jnp.maximum(rhs, 1e-38)),
                     jnp.where(stats.variance > 0, big, 1.0))
  b_star = jnp.minimum(b_star, big).astype(jnp.int32)
  return passed, b_star


class AdaptiveBatchState(NamedTuple):
  """State of the AdAdaGrad controller (arrays only, so it checkpoints).

  Attributes:
    batch_size: the batch size to use for the next step, shape=(), int32.
    count: tests performed, shape=(), int32.
    num_increases: how often the batch size grew, shape=(), int32.
    last_ratio: the last :math:`(\\sum_j s_j^2/b)/(\\eta^2\\|\\bar g\\|^2)`
      (the test passes when <= 1; inf when the gradient is 0), float32.
  """

  batch_size: jax.Array
  count: jax.Array
  num_increases: jax.Array
  last_ratio: jax.Array


class BatchSizeController(NamedTuple):
  """A pair of pure functions `init(initial_batch_size)`, `update(state,
  stats)`."""

  init: Callable[[int], AdaptiveBatchState]
  update: Callable[[AdaptiveBatchState, GradStats], AdaptiveBatchState]


def adadagrad_controller(
    eta: float = 0.5,
    max_batch_size: int = 2**16,
    round_to_power_of_two: bool = False,
) -> BatchSizeController:
  r"""AdAdaGrad's batch-size schedule: grow b when the norm test fails.

  .. math::
    b_{k+1} = \begin{cases}
      b_k & \text{if } \sum_j s_j^2 / b_k \le \eta^2 \|\bar g_k\|^2 \\
      \min(b_{max}, \max(b_k, b^\star_k)) & \text{otherwise}
    \end{cases}

  with :math:`b^\star_k` from :func:`norm_test`, optionally rounded up to a
  power of two (fewer distinct shapes, so fewer recompilations). The batch
  never shrinks. Pair it with `optax.adagrad` (AdAdaGrad) or any optimizer.

  Lau, Liu & Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
  Gradient Methods", 2024, arXiv 2402.11215.

  Args:
    eta: norm-test tolerance :math:`\eta > 0`.
    max_batch_size: cap :math:`b_{max}` >= 1.
    round_to_power_of_two: round a grown batch size up to a power of two
      (then capped at `max_batch_size`).

  Returns:
    A :class:`BatchSizeController`; `update` is jittable.

  Example::

    ctrl = adadagrad_controller(eta=0.5, max_batch_size=1024)
    cstate = ctrl.update(ctrl.init(32), stats)
    next_batch_size = int(cstate.batch_size)
  """
  _tree.check_range("eta", eta, 0.0, low_inclusive=False)
  if not isinstance(max_batch_size, int) or max_batch_size < 1:
    raise ValueError("max_batch_size must be an integer >= 1; got "
                     f"max_batch_size={max_batch_size!r}.")

  def init_fn(initial_batch_size: int) -> AdaptiveBatchState:
    if (not isinstance(initial_batch_size, int) or initial_batch_size < 2
        or initial_batch_size > max_batch_size):
      raise ValueError(
          "initial_batch_size must be an integer in [2, max_batch_size="
          f"{max_batch_size}]; got initial_batch_size={initial_batch_size!r}.")
    return AdaptiveBatchState(
        batch_size=jnp.asarray(initial_batch_size, jnp.int32),
        count=jnp.zeros([], jnp.int32),
        num_increases=jnp.zeros([], jnp.int32),
        last_ratio=jnp.zeros([], jnp.float32),
    )

  def update_fn(state: AdaptiveBatchState,
                stats: GradStats) -> AdaptiveBatchState:
    passed, b_star = norm_test(stats, eta)
    target = jnp.maximum(b_star, state.batch_size)
    if round_to_power_of_two:
      exponent = jnp.ceil(jnp.log2(target.astype(jnp.float32)))
      target = jnp.minimum(2.0 ** exponent, 2.0**30).astype(jnp.int32)
    target = jnp.minimum(target, max_batch_size).astype(jnp.int32)
    new_b = jnp.where(passed, state.batch_size, target).astype(jnp.int32)
    rhs = jnp.asarray(eta, jnp.float32) ** 2 * stats.mean_sq_norm
    lhs = stats.variance / stats.batch_size.astype(jnp.float32)
    ratio = jnp.where(rhs > 0, lhs / jnp.maximum(rhs, 1e-38),
                      jnp.where(lhs > 0, jnp.inf, 0.0))
    return AdaptiveBatchState(
        batch_size=new_b,
        count=state.count + 1,
        num_increases=state.num_increases
        + (new_b > state.batch_size).astype(jnp.int32),
        last_ratio=ratio.astype(jnp.float32),
    )

  return BatchSizeController(init=init_fn, update=update_fn)


def batch_size_for_next_step(state: AdaptiveBatchState) -> int:
  """The next batch size as a Python int (reads the device scalar).

  Args:
    state: the controller state after `update`.

  Returns:
    `int(state.batch_size)`.
  """
  return int(state.batch_size)
