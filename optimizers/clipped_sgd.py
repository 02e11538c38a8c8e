"""Clipped SGD (with optional momentum) for heavy-tailed gradient noise.

Zhang et al., "Why are Adaptive Methods Good for Attention Models?", 2020,
arXiv 1912.03194; Gorbunov et al., "Stochastic Optimization with Heavy-Tailed
Noise via Accelerated Gradient Clipping", 2020, arXiv 2005.10785.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics
from optax._src import utils

from gradax.optimizers import _tree

_MODES = ("global_norm", "coordinate")


class ScaleByClippedSgdState(NamedTuple):
  """State of :func:`scale_by_clipped_sgd`."""

  count: jax.Array  # shape=(), dtype=jnp.int32
  mu: optax.Updates  # momentum of clipped gradients, like params


def scale_by_clipped_sgd(
    clip_threshold: optax.ScalarOrSchedule = 1.0,
    momentum: float = 0.0,
    clip_mode: str = "global_norm",
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips the stochastic gradient, then (optionally) averages it.

  .. math::
    \mathrm{clip}_\lambda(g) = \min\!\left(1, \frac{\lambda}{\|g\|}\right) g
    \ \text{("global_norm")}, \qquad
    \mathrm{clip}_\lambda(g)_i = \max(-\lambda, \min(\lambda, g_i))
    \ \text{("coordinate")}, \\
    m_t = \beta m_{t-1} + (1-\beta)\,\mathrm{clip}_{\lambda_t}(g_t), \quad
    u_t = m_t,

  where :math:`\|g\|` is the norm over the whole pytree and :math:`\lambda_t`
  may follow a schedule (high-probability analyses let it grow with t). With
  :math:`\beta = 0` this is clipped SGD, which converges under noise with only
  a bounded :math:`\alpha`-th moment, :math:`\alpha \in (1, 2]`, where plain
  SGD can diverge.

  Zhang et al., "Why are Adaptive Methods Good for Attention Models?", 2020,
  arXiv 1912.03194.

  Args:
    clip_threshold: :math:`\lambda > 0`, a scalar or a schedule of the step.
    momentum: :math:`\beta` in [0, 1); 0 gives plain clipped SGD.
    clip_mode: "global_norm" or "coordinate".
    mu_dtype: optional dtype of the momentum.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = optax.chain(gradax.optimizers.scale_by_clipped_sgd(1.0),
                     optax.scale(-0.1))
    updates, state = tx.update(grads, tx.init(params), params)
  """
  _tree.check_range("clip_threshold", clip_threshold, 0.0, low_inclusive=False)
  _tree.check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
  if clip_mode not in _MODES:
    raise ValueError(
        f"clip_mode must be one of {_MODES}; got clip_mode={clip_mode!r}.")
  mu_dtype = utils.canonicalize_dtype(mu_dtype)

  def init_fn(params):
    # Always allocated, so that the state's structure does not depend on
    # whether `momentum` is a Python zero or an injected hyperparameter.
    return ScaleByClippedSgdState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lam = (clip_threshold(state.count) if callable(clip_threshold)
           else clip_threshold)
    if clip_mode == "global_norm":
      norm = optax.tree.norm(
          jax.tree.map(lambda g: g.astype(jnp.float32), updates))
      # Safe where the norm is 0: the factor is then 1 and g is 0 anyway.
      scale = jnp.minimum(1.0, lam / jnp.maximum(norm, 1e-30))
      clipped = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
    else:
      clipped = jax.tree.map(
          lambda g: jnp.clip(g, -lam, lam).astype(g.dtype), updates)
    count = numerics.safe_int32_increment(state.count)
    mu = optax.tree.update_moment(clipped, state.mu, momentum, 1)
    new_updates = jax.tree.map(lambda m, g: m.astype(g.dtype), mu, updates)
    mu = optax.tree.cast(mu, mu_dtype)
    return new_updates, ScaleByClippedSgdState(count=count, mu=mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clipped_sgd(
    learning_rate: optax.ScalarOrSchedule,
    clip_threshold: optax.ScalarOrSchedule = 1.0,
    momentum: float = 0.0,
    clip_mode: str = "global_norm",
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clipped SGD: :math:`x_{t+1} = x_t - \eta_t (m_t + \lambda_{wd} x_t)`.

  See :func:`scale_by_clipped_sgd` for :math:`m_t`. Zhang et al., "Why are
  Adaptive Methods Good for Attention Models?", 2020, arXiv 1912.03194.

  Args:
    learning_rate: a scalar or schedule :math:`\eta_t`.
    clip_threshold: clipping level, a scalar or schedule, > 0.
    momentum: in [0, 1).
    clip_mode: "global_norm" or "coordinate".
    weight_decay: decoupled weight decay >= 0.
    mask: optional mask (or mask function) of the leaves to decay.
    mu_dtype: optional dtype of the momentum.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = gradax.optimizers.clipped_sgd(0.1, clip_threshold=1.0, momentum=0.9)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      scale_by_clipped_sgd(clip_threshold=clip_threshold, momentum=momentum,
                           clip_mode=clip_mode, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
