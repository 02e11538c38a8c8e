"""Optimistic AMSGrad.

Wang, Li, Karimi & Li, "An Optimistic Acceleration of AMSGrad for Nonconvex
Optimization" (first version: "Optimistic Adaptive Acceleration for
Optimization"), 2019, arXiv 1903.01435.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics
from optax._src import utils

from gradax.optimizers import _tree


class ScaleByOptimisticAmsgradState(NamedTuple):
  """State of :func:`scale_by_optimistic_amsgrad`."""

  count: jax.Array  # shape=(), dtype=jnp.int32
  mu: optax.Updates  # theta_t, EMA of gradients (mu_dtype)
  nu: optax.Updates  # v_t, EMA of squared gradients
  nu_max: optax.Updates  # v-hat_t = max_s v_s
  correction: optax.Updates  # h_t / (sqrt(v-hat_{t-1}) + eps), the last hint


def scale_by_optimistic_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Optimistic AMSGrad, written as a single-sequence direction.

  The paper keeps two sequences, a "lazy" :math:`w_{t+1/2}` and the point
  :math:`w_t` where gradients are evaluated:

  .. math::
    \theta_t = \beta_1 \theta_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    \hat v_t = \max(\hat v_{t-1}, v_t), \\
    w_{t+1/2} = w_{t-1/2} - \eta\, \theta_t / (\sqrt{\hat v_t} + \epsilon),
    \quad
    w_{t+1} = w_{t+1/2} - \eta\, h_{t+1} / (\sqrt{\hat v_t} + \epsilon),

  where :math:`h_{t+1} = \beta_1 \theta_t + (1-\beta_1) m_{t+1}` predicts
  :math:`\theta_{t+1}` from a guess :math:`m_{t+1}` of the next gradient; here
  :math:`m_{t+1} = g_t`, the last gradient (the paper extrapolates several past
  gradients; with one the hint is the last gradient). The params this
  transform sees are :math:`w_t`, so it returns
  :math:`w_{t+1} - w_t = -\eta u_t` with

  .. math::
    u_t = \frac{\theta_t + h_{t+1}}{\sqrt{\hat v_t} + \epsilon} - c_t, \qquad
    c_{t+1} = \frac{h_{t+1}}{\sqrt{\hat v_t} + \epsilon}, \quad c_1 = 0,

  exact for a constant :math:`\eta`. As in the paper there is no bias
  correction.

  Wang et al., "An Optimistic Acceleration of AMSGrad for Nonconvex
  Optimization", 2019, arXiv 1903.01435.

  Args:
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to :math:`\sqrt{\hat v}`, > 0.
    mu_dtype: optional dtype of :math:`\theta`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = optax.chain(gradax.optimizers.scale_by_optimistic_amsgrad(),
                     optax.scale(-1e-3))
    updates, state = tx.update(grads, tx.init(params), params)
  """
  _tree.check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  _tree.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  _tree.check_range("eps", eps, 0.0, low_inclusive=False)
  mu_dtype = utils.canonicalize_dtype(mu_dtype)

  def init_fn(params):
    return ScaleByOptimisticAmsgradState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
        nu_max=optax.tree.zeros_like(params),
        correction=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)

    def leaf(g, m, vmax, c):
      denom = jnp.sqrt(vmax) + eps
      hint = b1 * m + (1 - b1) * g  # h_{t+1} with m_{t+1} = g_t
      new_c = hint / denom
      u = m / denom + new_c - c
      return u.astype(g.dtype), new_c.astype(c.dtype)

    out = jax.tree.map(leaf, updates, mu, nu_max, state.correction)
    new_updates = jax.tree.map(lambda _, o: o[0], updates, out)
    correction = jax.tree.map(lambda _, o: o[1], updates, out)
    count = numerics.safe_int32_increment(state.count)
    mu = optax.tree.cast(mu, mu_dtype)
    return new_updates, ScaleByOptimisticAmsgradState(
        count=count, mu=mu, nu=nu, nu_max=nu_max, correction=correction)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def optimistic_amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Optimistic AMSGrad with optional decoupled weight decay.

  :math:`w_{t+1} = w_t - \eta_t (u_t + \lambda w_t)` with :math:`u_t` from
  :func:`scale_by_optimistic_amsgrad`. Wang et al., "An Optimistic
  Acceleration of AMSGrad for Nonconvex Optimization", 2019, arXiv 1903.01435.

  Args:
    learning_rate: a scalar or schedule :math:`\eta_t`.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to :math:`\sqrt{\hat v}`, > 0.
    weight_decay: decoupled weight decay >= 0.
    mask: optional mask (or mask function) of the leaves to decay.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = gradax.optimizers.optimistic_amsgrad(1e-3)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      scale_by_optimistic_amsgrad(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
