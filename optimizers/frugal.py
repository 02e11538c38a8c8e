"""FRUGAL: a state-full subspace under Adam, state-free sign-SGD elsewhere.

Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_,
ICML 2025 (arXiv 2411.07837).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.optimizers import _projection as proj


class FrugalState(NamedTuple):
  """State of :func:`scale_by_frugal`.

  Attributes:
    count: steps taken, shape ``()``, int32.
    mu: Adam first moment of the state-full part: ``(r, min(m, n))`` f32 for
      matrix leaves, the leaf's shape (f32) for vectors and scalars.
    nu: Adam second moment, same shapes as ``mu``.
    basis: the stored SVD basis ``(max(m, n), r)`` f32 per matrix leaf when
      ``selection='svd'``; a size-0 f32 array otherwise.
  """
  count: jax.Array
  mu: Any
  nu: Any
  basis: Any


def _oriented(mshape):
  """Matrix shape with the longer side first (the side FRUGAL selects on)."""
  return (max(mshape), min(mshape))


def subspace_rank(mshape, density: float, selection: str) -> int:
  """Rows of the state-full subspace of a ``(m, n)`` matrix.

  ``blocks`` keeps ``round(density * max(m, n))`` whole rows (of the longer
  side); ``svd``/``random`` keep a rank ``round(density * min(m, n))``
  subspace. Both are at least 1.
  """
  longer, shorter = _oriented(mshape)
  if selection == "blocks":
    return max(1, min(longer, round(density * longer)))
  return max(1, min(shorter, round(density * shorter)))


def scale_by_frugal(
    density: float = 0.25,
    update_gap: int = 200,
    selection: str = "blocks",
    inactive_scale: float = 1.0,
    state_free: str = "sign_sgd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""FRUGAL's full-rank update with state kept only for a subspace.

  Each matrix leaf ``G`` (viewed as a matrix with its longer side as rows)
  is split as ``G = S(G) + (G - S(G))``, where ``S`` is the state-full
  selection, re-chosen every ``update_gap`` steps (the Adam moments restart
  with it):

  * ``'blocks'``: a contiguous block of ``k = round(ρ·rows)`` rows,
    cycling through the matrix (BAdam-style block selection);
  * ``'svd'`` / ``'random'``: the projection ``P Pᵀ G`` onto the top-``r``
    left singular vectors or a seeded Gaussian basis, ``r = round(ρ·cols)``.

  .. math::
    U = P\,\mathrm{Adam}(P^T G) + \alpha\,\mathrm{sign}(G - P P^T G)

  with ``α = inactive_scale`` (``'sgd'`` uses ``G - PPᵀG`` instead of its
  sign). Vectors and scalars are state-full (plain Adam), as in the paper.

  Args:
    density: fraction ρ in (0, 1] of the state-full subspace.
    update_gap: steps between re-selections (>= 1).
    selection: ``'blocks'``, ``'svd'`` or ``'random'``.
    inactive_scale: step multiplier α of the state-free part (1.0 for
      pre-training, 0.1 for fine-tuning in the paper).
    state_free: ``'sign_sgd'`` or ``'sgd'``.
    b1: Adam first-moment decay in [0, 1).
    b2: Adam second-moment decay in [0, 1).
    eps: Adam epsilon (>= 0).
    seed: seed of the random bases.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(scale_by_frugal(density=0.25), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  proj.check_range("density", density, 0.0, 1.0, low_inclusive=False)
  proj.check_positive_int("update_gap", update_gap)
  if selection not in ("blocks", "svd", "random"):
    raise ValueError(
        f"selection must be 'blocks', 'svd' or 'random', got {selection!r}.")
  if state_free not in ("sign_sgd", "sgd"):
    raise ValueError(
        f"state_free must be 'sign_sgd' or 'sgd', got {state_free!r}.")
  proj.check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  proj.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  proj.check_range("eps", eps, 0.0, float("inf"))
  proj.check_range("inactive_scale", inactive_scale, 0.0, float("inf"))

  def init_fn(params):
    def moment(p):
      mshape = proj.matrix_shape(p.shape)
      if mshape is None:
        return jnp.zeros(p.shape, jnp.float32)
      k = subspace_rank(mshape, density, selection)
      return jnp.zeros((k, _oriented(mshape)[1]), jnp.float32)

    def basis(p):
      mshape = proj.matrix_shape(p.shape)
      if mshape is None or selection != "svd":
        return jnp.zeros((0,), jnp.float32)
      k = subspace_rank(mshape, density, selection)
      return jnp.zeros((_oriented(mshape)[0], k), jnp.float32)

    return FrugalState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(moment, params),
        nu=jax.tree.map(moment, params),
        basis=jax.tree.map(basis, params))

  def free(x):
    return jnp.sign(x) if state_free == "sign_sgd" else x

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = optax.safe_int32_increment(state.count)
    epoch = state.count // update_gap
    refresh = state.count % update_gap == 0
    local_count = state.count % update_gap + 1  # steps since re-selection

    def leaf(i, g, mu, nu, basis):
      mshape = proj.matrix_shape(g.shape)
      if mshape is None:
        return (*proj.adam_leaf(g, mu, nu, count, b1, b2, eps), basis)
      transpose = not proj.is_left(mshape)
      g2 = g.astype(jnp.float32).reshape(mshape)
      g2 = g2.T if transpose else g2
      rows = g2.shape[0]
      k = mu.shape[0]
      mu = jnp.where(refresh, 0.0, mu)
      nu = jnp.where(refresh, 0.0, nu)
      if selection == "blocks":
        num_blocks = -(-rows // k)
        start = (epoch % num_blocks) * k
        idx = (start + jnp.arange(k)) % rows
        sel = g2[idx]
        mu, nu = proj.adam_moments(sel, mu, nu, b1, b2)
        active = proj.adam_direction(mu, nu, local_count, b1, b2, eps)
        inside = jnp.zeros((rows,), bool).at[idx].set(True)[:, None]
        u = jnp.where(inside, 0.0, inactive_scale * free(g2))
        u = u.at[idx].set(active)
      else:
        if selection == "random":
          p = proj.gaussian_basis(proj.leaf_key(seed, i, epoch), g2.shape, k)
          # An orthonormal basis keeps PPᵀ a projection.
          p, _ = jnp.linalg.qr(p)
        else:
          p = jax.lax.cond(refresh, lambda: proj.svd_basis(g2, k),
                           lambda: basis)
          basis = p
        r = p.T @ g2
        mu, nu = proj.adam_moments(r, mu, nu, b1, b2)
        active = proj.adam_direction(mu, nu, local_count, b1, b2, eps)
        u = p @ active + inactive_scale * free(g2 - p @ r)
      u = u.T if transpose else u
      return u.reshape(g.shape).astype(g.dtype), mu, nu, basis

    new_updates, (mu, nu, basis) = proj.map_leaves(
        leaf, updates, state.mu, state.nu, state.basis)
    new_state = FrugalState(count=count, mu=mu, nu=nu, basis=basis)
    return new_updates, proj.keep_sharding(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.25,
    update_gap: int = 200,
    selection: str = "blocks",
    inactive_scale: float = 1.0,
    state_free: str = "sign_sgd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""FRUGAL optimizer: Adam on a subspace, sign-SGD on the rest.

  ``-lr * (FRUGAL update + weight_decay * params)``; see
  :func:`scale_by_frugal`. Zmushko et al., `FRUGAL
  <https://arxiv.org/abs/2411.07837>`_, 2025.

  Args:
    learning_rate: a scalar or schedule.
    density: state-full fraction in (0, 1].
    update_gap: steps between re-selections.
    selection: ``'blocks'``, ``'svd'`` or ``'random'``.
    inactive_scale: step multiplier of the state-free part.
    state_free: ``'sign_sgd'`` or ``'sgd'``.
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    seed: seed of the random bases.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.frugal(1e-3, density=0.25)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return optax.chain(
      scale_by_frugal(density=density, update_gap=update_gap,
                      selection=selection, inactive_scale=inactive_scale,
                      state_free=state_free, b1=b1, b2=b2, eps=eps,
                      seed=seed),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
