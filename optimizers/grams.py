"""Grams: gradient descent with adaptive momentum scaling.

Cao et al., "Grams: Gradient Descent with Adaptive Momentum Scaling", 2024,
arXiv 2412.17107.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics
from optax._src import utils

from gradax.optimizers import _tree


class ScaleByGramsState(NamedTuple):
  """State of :func:`scale_by_grams` (the same moments as Adam's)."""

  count: jax.Array  # shape=(), dtype=jnp.int32
  mu: optax.Updates  # first moment, like params (mu_dtype)
  nu: optax.Updates  # second moment, like params


def scale_by_grams(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam's magnitude with the current gradient's sign (Grams).

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \\
    \hat m_t = m_t/(1-\beta_1^t), \quad \hat v_t = v_t/(1-\beta_2^t), \\
    u_t = \mathrm{sign}(g_t)\, |\hat m_t| / (\sqrt{\hat v_t + \epsilon_{root}}
      + \epsilon).

  The direction comes from the current gradient, the magnitude from Adam
  (cautious optimizers instead zero the coordinates where the signs differ).

  Cao et al., "Grams: Gradient Descent with Adaptive Momentum Scaling", 2024,
  arXiv 2412.17107.

  Args:
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to the root of the second moment, >= 0.
    eps_root: added inside the root, >= 0.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = optax.chain(gradax.optimizers.scale_by_grams(), optax.scale(-1e-3))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
  """
  _tree.check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  _tree.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  _tree.check_range("eps", eps, 0.0)
  _tree.check_range("eps_root", eps_root, 0.0)
  mu_dtype = utils.canonicalize_dtype(mu_dtype)

  def init_fn(params):
    return ScaleByGramsState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = numerics.safe_int32_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    new_updates = jax.tree.map(
        lambda g, m, v: (jnp.sign(g) * jnp.abs(m)
                         / (jnp.sqrt(v + eps_root) + eps)).astype(g.dtype),
        updates, mu_hat, nu_hat)
    mu = optax.tree.cast(mu, mu_dtype)
    return new_updates, ScaleByGramsState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def grams(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Grams with decoupled weight decay.

  .. math::
    x_{t+1} = x_t - \eta_t\,(\mathrm{sign}(g_t)\,|\hat m_t|/(\sqrt{\hat v_t}
      + \epsilon) + \lambda x_t)

  See :func:`scale_by_grams`. Cao et al., "Grams: Gradient Descent with
  Adaptive Momentum Scaling", 2024, arXiv 2412.17107.

  Args:
    learning_rate: a scalar or schedule :math:`\eta_t`.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: added to the root of the second moment.
    eps_root: added inside the root.
    weight_decay: decoupled decay :math:`\lambda` >= 0.
    mask: optional mask (or mask function) of the leaves to decay.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = gradax.optimizers.grams(1e-3, weight_decay=1e-4)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      scale_by_grams(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                     mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
