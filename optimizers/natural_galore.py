"""Natural GaLore: a Woodbury empirical-Fisher step inside GaLore's subspace.

Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM Training
and Fine-tuning <https://arxiv.org/abs/2410.16029>`_, 2024 (arXiv 2410.16029).
The projection is ``optax.contrib.scale_by_galore``'s.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.optimizers import _projection as proj


class WoodburyFisherState(NamedTuple):
  """State of :func:`scale_by_woodbury_fisher`.

  Attributes:
    count: steps taken, shape ``()``, int32.
    history: ring buffer of the last ``history_size`` gradients per leaf,
      ``(history_size, *leaf.shape)`` f32.
  """
  count: jax.Array
  history: Any


def scale_by_woodbury_fisher(
    history_size: int = 10,
    damping: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions each leaf by its damped inverse empirical Fisher.

  With ``G`` the ``(s, d)`` matrix of the last ``s = min(t, history_size)``
  gradients of a leaf (current one included), the empirical Fisher is
  ``F = λI + GᵀG/s`` and, by the Woodbury identity,

  .. math::
    F^{-1} g = \frac{1}{\lambda}\Big(g - G^T (s\lambda I + G G^T)^{-1} G g
    \Big),

  which needs only an ``s × s`` solve.

  Args:
    history_size: gradients kept per leaf (>= 1).
    damping: ``λ > 0``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(scale_by_woodbury_fisher(4), optax.scale_by_adam())
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  proj.check_positive_int("history_size", history_size)
  proj.check_range("damping", damping, 0.0, float("inf"), low_inclusive=False)

  def init_fn(params):
    return WoodburyFisherState(
        count=jnp.zeros([], jnp.int32),
        history=jax.tree.map(
            lambda p: jnp.zeros((history_size,) + p.shape, jnp.float32),
            params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = optax.safe_int32_increment(state.count)
    slot = state.count % history_size
    n = jnp.minimum(count, history_size).astype(jnp.float32)
    lam = jnp.asarray(damping, jnp.float32)

    def leaf(g, hist):
      g32 = g.astype(jnp.float32)
      hist = hist.at[slot].set(g32)
      gm = hist.reshape(history_size, -1)
      gv = g32.reshape(-1)
      # eigh of the PSD Gram keeps (sλI + GGᵀ)^{-1} well-defined even when
      # the gradients are large and λ small.
      evals, evecs = jnp.linalg.eigh(gm @ gm.T)
      inv = 1.0 / (n * lam + jnp.maximum(evals, 0.0))
      coef = evecs @ (inv * (evecs.T @ (gm @ gv)))
      nat = (gv - gm.T @ coef) / lam
      return nat.reshape(g.shape).astype(g.dtype), hist

    new_updates, (history,) = proj.map_leaves(
        lambda i, g, h: leaf(g, h), updates, state.history)
    new_state = WoodburyFisherState(count, history)
    return new_updates, proj.keep_sharding(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_natural_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    history_size: int = 10,
    damping: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore projection, Woodbury natural gradient, then Adam, projected back.

  For a matrix leaf ``W`` with GaLore basis ``P`` (top-``rank`` singular
  vectors of the gradient, refreshed every ``update_proj_gap`` steps):

  .. math::
    R = P^T G,\quad \tilde R = F_R^{-1} R,\quad
    \Delta W = \text{scale}\cdot P\,\mathrm{Adam}(\tilde R),

  with ``F_R^{-1}`` from :func:`scale_by_woodbury_fisher` over the last
  ``history_size`` low-rank gradients. Non-matrix leaves get the same
  natural-gradient Adam step at full size (as in ``optax.contrib.galore``).

  Args:
    rank: projection rank, at most the smaller dimension of every matrix.
    update_proj_gap: steps between SVD refreshes (>= 1).
    scale: factor on the projected-back update.
    history_size: gradients in the empirical Fisher (>= 1).
    damping: Fisher damping ``λ > 0``.
    b1: Adam first-moment decay in [0, 1).
    b2: Adam second-moment decay in [0, 1).
    eps: Adam epsilon (>= 0).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(scale_by_natural_galore(rank=4), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  proj.check_positive_int("rank", rank)
  proj.check_positive_int("update_proj_gap", update_proj_gap)
  proj.check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  proj.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  proj.check_range("eps", eps, 0.0, float("inf"))
  base = optax.chain(scale_by_woodbury_fisher(history_size, damping),
                     optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  inner = optax.contrib.scale_by_galore(
      rank=rank, update_proj_gap=update_proj_gap, scale=scale,
      base_optimizer=base)

  def init_fn(params):
    proj.check_rank(rank, params)
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    new_updates, new_state = inner.update(
        proj.replicate(updates), state, proj.replicate(params))
    return (proj.restore(new_updates, updates),
            proj.keep_sharding(new_state, state))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def natural_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    history_size: int = 10,
    damping: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Natural GaLore optimizer; see :func:`scale_by_natural_galore`.

  Args:
    learning_rate: a scalar or schedule.
    rank: projection rank.
    update_proj_gap: steps between SVD refreshes.
    scale: factor on the projected-back update.
    history_size: gradients in the empirical Fisher.
    damping: Fisher damping.
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.natural_galore(1e-3, rank=8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return optax.chain(
      scale_by_natural_galore(
          rank=rank, update_proj_gap=update_proj_gap, scale=scale,
          history_size=history_size, damping=damping, b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
