"""Subset-Norm adaptive step sizes and Subspace-Momentum.

Nguyen, Ene and Nguyen, `Subset-Norm and Subspace-Momentum: Faster
Memory-Efficient Adaptive Optimization with Convergence Guarantees
<https://arxiv.org/abs/2411.07120>`_, ICML 2025 (arXiv 2411.07120).
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.optimizers import _projection as proj


class SubsetNormState(NamedTuple):
  """State of :func:`scale_by_subset_norm_subspace_momentum`.

  Attributes:
    count: steps taken, shape ``()``, int32.
    mu: momentum. Matrix leaves with a ``rank``: ``(rank, min(m, n))`` f32
      (momentum of ``PᵀG``); vectors: the leaf's shape; size 0 without
      momentum (``b1 = 0``).
    nu: one second-moment accumulator per subset (f32); size 0 when not
      adaptive.
    basis: stored SVD basis ``(max(m, n), rank)`` f32 per matrix leaf when
      ``projection='svd'``; size 0 otherwise.
  """
  count: jax.Array
  mu: Any
  nu: Any
  basis: Any


def subsets(shape, subset_size: int | None) -> tuple[int, int]:
  """``(number of subsets, subset size)`` of a leaf (the last one padded).

  With ``subset_size=None``: a matrix ``(m, n)`` gets one subset per row of
  its longer side (``max(m, n)`` subsets of ``min(m, n)`` entries, the
  paper's heuristic); a vector of ``d`` entries gets subsets of
  ``ceil(sqrt(d))`` contiguous entries. An int gives contiguous subsets of
  that size over the flattened leaf.
  """
  d = math.prod(shape)
  if subset_size is None:
    mshape = proj.matrix_shape(shape)
    if mshape is not None:
      return max(mshape), min(mshape)
    subset_size = max(1, math.isqrt(max(d - 1, 0)) + 1) if d > 1 else 1
  size = min(subset_size, max(d, 1))
  return -(-d // size), size


def _subset_view(x: jax.Array, subset_size: int | None) -> jax.Array:
  """``x`` as a ``(num_subsets, size)`` array, zero-padded, in f32."""
  num, size = subsets(x.shape, subset_size)
  mshape = proj.matrix_shape(x.shape)
  if subset_size is None and mshape is not None:
    x2 = x.reshape(mshape)
    return x2 if proj.is_left(mshape) else x2.T
  flat = x.reshape(-1)
  flat = jnp.pad(flat, (0, num * size - flat.size))
  return flat.reshape(num, size)


def _from_subset_view(y: jax.Array, shape, subset_size: int | None):
  mshape = proj.matrix_shape(shape)
  if subset_size is None and mshape is not None:
    y = y if proj.is_left(mshape) else y.T
    return y.reshape(shape)
  return y.reshape(-1)[:math.prod(shape)].reshape(shape)


def scale_by_subset_norm_subspace_momentum(
    rank: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    subset_size: int | None = None,
    update_proj_gap: int = 200,
    projection: str = "svd",
    adaptive: bool = True,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Subset-Norm step sizes on top of (subspace) momentum.

  Numerator (momentum). With ``rank`` set, a matrix leaf ``G`` keeps
  momentum only in a rank-``r`` subspace ``P`` (top singular vectors, or a
  seeded orthonormalised Gaussian basis), refreshed every
  ``update_proj_gap`` steps (the momentum restarts with it); the orthogonal
  complement is plain SGD:

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) P^T G_t,\quad
    N_t = P\,\hat m_t + (G_t - P P^T G_t),

  with ``m̂`` bias-corrected since the last refresh. Without ``rank`` (and
  for vectors) ``N_t`` is the usual bias-corrected EMA momentum; with
  ``b1 = 0`` it is ``G_t``.

  Denominator (Subset-Norm). Coordinates are partitioned into subsets ``S``
  (see :func:`subsets`), each with one accumulator fed by the raw gradient:

  .. math::
    v_{t,S} = \beta_2 v_{t-1,S} + c\,\|G_{t,S}\|^2,\quad
    U_t = N_t / (\sqrt{\hat v_{t,S}} + \epsilon),

  where ``c = 1 - β2`` and ``v̂`` is bias-corrected for ``β2 < 1``, and
  ``β2 = 1`` gives AdaGrad's sum (``c = 1``, no correction). With
  ``adaptive=False`` the update is ``N_t``.

  Args:
    rank: subspace rank for matrix momentum, at most the smaller matrix
      dimension; ``None`` for full momentum.
    b1: momentum decay in [0, 1).
    b2: second-moment decay in [0, 1] (1 = AdaGrad).
    eps: added to the root of the accumulator (>= 0).
    subset_size: subset size (>= 1), or ``None`` for the heuristic.
    update_proj_gap: steps between subspace refreshes (>= 1).
    projection: ``'svd'`` or ``'random'``.
    adaptive: whether to divide by the Subset-Norm root.
    seed: seed of the random bases.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = scale_by_subset_norm_subspace_momentum(rank=4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  if rank is not None:
    proj.check_positive_int("rank", rank)
  if subset_size is not None:
    proj.check_positive_int("subset_size", subset_size)
  proj.check_positive_int("update_proj_gap", update_proj_gap)
  if projection not in ("svd", "random"):
    raise ValueError(
        f"projection must be 'svd' or 'random', got {projection!r}.")
  proj.check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  proj.check_range("b2", b2, 0.0, 1.0)
  proj.check_range("eps", eps, 0.0, float("inf"))
  use_momentum = not (isinstance(b1, (int, float)) and b1 == 0)

  def init_fn(params):
    if rank is not None:
      proj.check_rank(rank, params)

    def mu(p):
      if not use_momentum:
        return jnp.zeros((0,), jnp.float32)
      mshape = proj.matrix_shape(p.shape)
      if rank is None or mshape is None:
        return jnp.zeros(p.shape, jnp.float32)
      return jnp.zeros((rank, min(mshape)), jnp.float32)

    def nu(p):
      if not adaptive:
        return jnp.zeros((0,), jnp.float32)
      return jnp.zeros((subsets(p.shape, subset_size)[0],), jnp.float32)

    def basis(p):
      mshape = proj.matrix_shape(p.shape)
      if (rank is None or mshape is None or projection != "svd"
          or not use_momentum):
        return jnp.zeros((0,), jnp.float32)
      return jnp.zeros((max(mshape), rank), jnp.float32)

    return SubsetNormState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(mu, params),
        nu=jax.tree.map(nu, params),
        basis=jax.tree.map(basis, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = optax.safe_int32_increment(state.count)
    epoch = state.count // update_proj_gap
    refresh = state.count % update_proj_gap == 0
    local_count = state.count % update_proj_gap + 1
    t = count.astype(jnp.float32)

    def leaf(i, g, mu, nu, basis):
      g32 = g.astype(jnp.float32)
      mshape = proj.matrix_shape(g.shape)
      # Numerator.
      if not use_momentum:
        num = g32
      elif rank is None or mshape is None:
        mu = b1 * mu + (1.0 - b1) * g32
        num = mu / (1.0 - jnp.asarray(b1, jnp.float32) ** t)
      else:
        transpose = not proj.is_left(mshape)
        g2 = g32.reshape(mshape)
        g2 = g2.T if transpose else g2
        if projection == "random":
          p = proj.gaussian_basis(proj.leaf_key(seed, i, epoch), g2.shape,
                                  rank)
          p, _ = jnp.linalg.qr(p)
        else:
          p = jax.lax.cond(refresh, lambda: proj.svd_basis(g2, rank),
                           lambda: basis)
          basis = p
        r = p.T @ g2
        mu = jnp.where(refresh, 0.0, mu)
        mu = b1 * mu + (1.0 - b1) * r
        mu_hat = mu / (1.0 - jnp.asarray(b1, jnp.float32)
                       ** local_count.astype(jnp.float32))
        num2 = p @ mu_hat + (g2 - p @ r)
        num = (num2.T if transpose else num2).reshape(g.shape)
      # Denominator.
      if adaptive:
        sq = jnp.sum(jnp.square(_subset_view(g32, subset_size)), axis=1)
        b2_ = jnp.asarray(b2, jnp.float32)
        is_sum = b2_ == 1.0  # AdaGrad; a jnp test so traced b2 works too
        nu = b2_ * nu + jnp.where(is_sum, 1.0, 1.0 - b2_) * sq
        nu_hat = nu / jnp.where(is_sum, 1.0, 1.0 - b2_ ** t)
        denom = jnp.sqrt(nu_hat) + eps
        view = _subset_view(num, subset_size) / denom[:, None]
        num = _from_subset_view(view, g.shape, subset_size)
      return num.astype(g.dtype), mu, nu, basis

    new_updates, fields = proj.map_leaves(
        leaf, updates, state.mu, state.nu, state.basis)
    return new_updates, proj.keep_sharding(SubsetNormState(count, *fields),
                                           state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_subset_norm(
    b2: float = 1.0,
    eps: float = 1e-8,
    subset_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Subset-Norm AdaGrad scaling: ``g / (sqrt(v_S) + eps)``,
  ``v_S += ‖g_S‖²``.

  One accumulator per subset of coordinates (see :func:`subsets`); ``b2 < 1``
  gives the EMA (RMSProp-style) variant. Same as
  ``scale_by_subset_norm_subspace_momentum(b1=0, ...)``.

  Args:
    b2: accumulator decay in [0, 1]; 1 is AdaGrad.
    eps: added to the root (>= 0).
    subset_size: subset size, or ``None`` for the heuristic.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(scale_by_subset_norm(), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return scale_by_subset_norm_subspace_momentum(
      rank=None, b1=0.0, b2=b2, eps=eps, subset_size=subset_size)


def scale_by_subspace_momentum(
    rank: int,
    b1: float = 0.9,
    update_proj_gap: int = 200,
    projection: str = "svd",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Subspace-Momentum: ``P m̂ + (G - PPᵀG)``, momentum kept for ``PᵀG`` only.

  Same as ``scale_by_subset_norm_subspace_momentum(adaptive=False, ...)``.

  Args:
    rank: subspace rank, at most the smaller matrix dimension.
    b1: momentum decay in [0, 1).
    update_proj_gap: steps between subspace refreshes.
    projection: ``'svd'`` or ``'random'``.
    seed: seed of the random bases.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(scale_by_subspace_momentum(4), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return scale_by_subset_norm_subspace_momentum(
      rank=rank, b1=b1, update_proj_gap=update_proj_gap,
      projection=projection, adaptive=False, seed=seed)


def _alias(inner, learning_rate, weight_decay, mask):
  return optax.chain(inner, optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def subset_norm_adagrad(
    learning_rate: optax.ScalarOrSchedule,
    b2: float = 1.0,
    eps: float = 1e-8,
    subset_size: int | None = None,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Subset-Norm AdaGrad: ``θ -= lr · g / (sqrt(Σ_τ ‖g_{τ,S}‖²) + eps)``.

  See :func:`scale_by_subset_norm`.

  Args:
    learning_rate: a scalar or schedule.
    b2: accumulator decay (1 = AdaGrad).
    eps: added to the root.
    subset_size: subset size, or ``None`` for the heuristic.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.subset_norm_adagrad(0.1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return _alias(scale_by_subset_norm(b2=b2, eps=eps, subset_size=subset_size),
                learning_rate, weight_decay, mask)


def subspace_momentum(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    b1: float = 0.9,
    update_proj_gap: int = 200,
    projection: str = "svd",
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with Subspace-Momentum; see :func:`scale_by_subspace_momentum`.

  Args:
    learning_rate: a scalar or schedule.
    rank: subspace rank.
    b1: momentum decay.
    update_proj_gap: steps between subspace refreshes.
    projection: ``'svd'`` or ``'random'``.
    seed: seed of the random bases.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.subspace_momentum(0.1, rank=4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return _alias(
      scale_by_subspace_momentum(rank, b1=b1, update_proj_gap=update_proj_gap,
                                 projection=projection, seed=seed),
      learning_rate, weight_decay, mask)


def subset_norm_subspace_momentum(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    subset_size: int | None = None,
    update_proj_gap: int = 200,
    projection: str = "svd",
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Subset-Norm step sizes with Subspace-Momentum (the paper's SN+SM).

  See :func:`scale_by_subset_norm_subspace_momentum`.

  Args:
    learning_rate: a scalar or schedule.
    rank: subspace rank of the momentum.
    b1: momentum decay.
    b2: Subset-Norm decay (1 = AdaGrad).
    eps: added to the root.
    subset_size: subset size, or ``None`` for the heuristic.
    update_proj_gap: steps between subspace refreshes.
    projection: ``'svd'`` or ``'random'``.
    seed: seed of the random bases.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.subset_norm_subspace_momentum(1e-2, rank=4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return _alias(
      scale_by_subset_norm_subspace_momentum(
          rank=rank, b1=b1, b2=b2, eps=eps, subset_size=subset_size,
          update_proj_gap=update_proj_gap, projection=projection,
          seed=seed),
      learning_rate, weight_decay, mask)
