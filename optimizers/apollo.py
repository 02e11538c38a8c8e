"""APOLLO and APOLLO-Mini: approximated gradient scaling with low-rank state.

Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
<https://arxiv.org/abs/2412.05270>`_, MLSys 2025 (arXiv 2412.05270).
"""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.optimizers import _projection as proj


class ApolloState(NamedTuple):
  """State of :func:`scale_by_apollo`.

  Attributes:
    count: steps taken, shape ``()``, int32.
    mu: first moment; ``(r, n)`` or ``(m, r)`` f32 for matrix leaves, the
      leaf's shape (f32) for vectors and scalars.
    nu: second moment, same shapes as ``mu``.
    prev_norm: ``‖U_{t-1}‖/c_{t-1}`` per leaf (the norm-growth limiter's
      memory, see :func:`scale_by_apollo`), shape ``()``, f32.
    basis: per matrix leaf the stored SVD basis ``(max(m, n), r)`` f32 when
      ``projection='svd'``; a size-0 f32 array otherwise (random bases are
      regenerated from ``seed``).
  """
  count: jax.Array
  mu: Any
  nu: Any
  prev_norm: Any
  basis: Any


def scale_by_apollo(
    rank: int = 1,
    scale_type: str = "channel",
    scale: float = 1.0,
    update_proj_gap: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    norm_growth_limit: float | None = 1.01,
    projection: str = "random",
    seed: int = 0,
    vector_mode: str = "adam",
) -> optax.GradientTransformationExtraArgs:
  r"""Scales gradients by APOLLO's approximated channel- or tensor-wise factor.

  For each matrix leaf ``G`` (leaves of 2+ dims, viewed as
  ``(prod(shape[:-1]), shape[-1])``), with a rank-``r`` basis ``P`` redrawn
  every ``update_proj_gap`` steps (seeded Gaussian, or top singular vectors):

  .. math::
    R_t = P^T G_t,\quad m_t = \beta_1 m_{t-1} + (1-\beta_1) R_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) R_t^2,\\
    \tilde R_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon),\quad
    s_j = \|\tilde R_{t,:j}\| / (\|R_{t,:j}\| + 10^{-8}),\quad
    U_t = \sqrt{\text{scale}}\; G_t\, \mathrm{diag}(s),

  with ``s`` one scalar per channel (``'channel'``) or per tensor
  (``'tensor'``). The Fira norm-growth limiter then rescales ``U_t`` so that
  ``‖U_t‖/c_t <= γ ‖U_{t-1}‖/c_{t-1}`` (``γ = norm_growth_limit``), with
  ``c_t = sqrt(1-β₂ᵗ)/(1-β₁ᵗ)`` Adam's bias-correction step factor: the
  reference code limits the scaled gradient before it multiplies in ``c_t``,
  which holds the first ~10 steps back (``c_t`` falls from 0.32 to 0.15).
  Vectors and scalars get plain Adam, as in the reference code
  (``vector_mode='adam'``), or are treated as ``(1, d)`` matrices with a
  rank-1 projection (``vector_mode='apollo'``, which keeps two floats per
  vector; it is what brings APOLLO-Mini under 0.1 bytes/param on small
  models, whose biases and norms are a visible share of the parameters).

  Args:
    rank: projection rank ``r``, at most the smaller matrix dimension.
    scale_type: ``'channel'`` or ``'tensor'``.
    scale: the factor whose square root multiplies the update (APOLLO-Mini
      uses 128).
    update_proj_gap: steps between basis refreshes (>= 1).
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: Adam's epsilon (>= 0).
    norm_growth_limit: ``γ > 1`` of the limiter, or ``None`` to disable it.
    projection: ``'random'`` (seeded Gaussian, no stored basis) or ``'svd'``.
    seed: seed of the random bases.
    vector_mode: ``'adam'`` or ``'apollo'`` (see above).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(scale_by_apollo(rank=4), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  proj.check_positive_int("rank", rank)
  proj.check_positive_int("update_proj_gap", update_proj_gap)
  if scale_type not in ("channel", "tensor"):
    raise ValueError(
        f"scale_type must be 'channel' or 'tensor', got {scale_type!r}.")
  if projection not in ("random", "svd"):
    raise ValueError(
        f"projection must be 'random' or 'svd', got {projection!r}.")
  if vector_mode not in ("adam", "apollo"):
    raise ValueError(
        f"vector_mode must be 'adam' or 'apollo', got {vector_mode!r}.")
  proj.check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  proj.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  proj.check_range("eps", eps, 0.0, float("inf"))
  proj.check_range("scale", scale, 0.0, float("inf"), low_inclusive=False)
  if norm_growth_limit is not None:
    proj.check_range("norm_growth_limit", norm_growth_limit, 1.0,
                     float("inf"), low_inclusive=False)

  def as_matrix_shape(shape):
    mshape = proj.matrix_shape(shape)
    if mshape is None and vector_mode == "apollo":
      return (1, max(1, math.prod(shape)))
    return mshape

  def leaf_rank(mshape):
    return min(rank, min(mshape))  # only vectors are clamped (to 1)

  def init_fn(params):
    proj.check_rank(rank, params)

    def moment(p):
      mshape = as_matrix_shape(p.shape)
      shape = (p.shape if mshape is None
               else proj.projected_shape(mshape, leaf_rank(mshape)))
      return jnp.zeros(shape, jnp.float32)

    def basis(p):
      mshape = as_matrix_shape(p.shape)
      if mshape is None or projection == "random":
        return jnp.zeros((0,), jnp.float32)
      return jnp.zeros(proj.basis_shape(mshape, leaf_rank(mshape)),
                       jnp.float32)

    return ApolloState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(moment, params),
        nu=jax.tree.map(moment, params),
        prev_norm=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params),
        basis=jax.tree.map(basis, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = optax.safe_int32_increment(state.count)
    epoch = state.count // update_proj_gap
    refresh = state.count % update_proj_gap == 0

    def leaf(i, g, mu, nu, prev, basis):
      mshape = as_matrix_shape(g.shape)
      if mshape is None:
        return (*proj.adam_leaf(g, mu, nu, count, b1, b2, eps), prev, basis)
      r_leaf = leaf_rank(mshape)
      g2 = g.astype(jnp.float32).reshape(mshape)
      if projection == "random":
        p = proj.gaussian_basis(proj.leaf_key(seed, i, epoch), mshape, r_leaf)
      else:
        p = jax.lax.cond(refresh, lambda: proj.svd_basis(g2, r_leaf),
                         lambda: basis)
        basis = p
      r = proj.project(g2, p)
      mu, nu = proj.adam_moments(r, mu, nu, b1, b2)
      r_tilde = proj.adam_direction(mu, nu, count, b1, b2, eps)
      if scale_type == "tensor":
        s = jnp.linalg.norm(r_tilde) / (jnp.linalg.norm(r) + 1e-8)
      else:
        axis = 0 if proj.is_left(mshape) else 1  # the rank axis
        s = (jnp.linalg.norm(r_tilde, axis=axis, keepdims=True)
             / (jnp.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))
      u = g2 * s * jnp.sqrt(jnp.asarray(scale, jnp.float32))
      if norm_growth_limit is not None:
        # The reference (zhuhanqing/APOLLO) limits the scaled gradient before
        # Adam's bias-correction step factor c_t = sqrt(1-b2^t)/(1-b1^t), so
        # the limiter compares ||U_t|| / c_t across steps.
        tf = count.astype(jnp.float32)
        c_t = jnp.sqrt(1.0 - b2 ** tf) / (1.0 - b1 ** tf)
        norm = jnp.linalg.norm(u) / c_t
        limiter = jnp.where(
            state.count > 0,
            jnp.maximum(norm / (prev + 1e-8), norm_growth_limit)
            / norm_growth_limit, 1.0)
        u = u / limiter
        prev = norm / limiter
      return (u.reshape(g.shape).astype(g.dtype), mu, nu,
              prev.astype(jnp.float32), basis)

    new_updates, (mu, nu, prev_norm, basis) = proj.map_leaves(
        leaf, updates, state.mu, state.nu, state.prev_norm, state.basis)
    new_state = ApolloState(count=count, mu=mu, nu=nu, prev_norm=prev_norm,
                            basis=basis)
    return new_updates, proj.keep_sharding(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 1,
    scale_type: str = "channel",
    scale: float = 1.0,
    update_proj_gap: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    norm_growth_limit: float | None = 1.01,
    projection: str = "random",
    seed: int = 0,
    vector_mode: str = "adam",
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO: AdamW-like training with rank-``r`` optimizer state.

  The update is ``-lr * (APOLLO-scaled gradient + weight_decay * params)``;
  see :func:`scale_by_apollo` for the rule. Zhu et al., `APOLLO: SGD-like
  Memory, AdamW-level Performance <https://arxiv.org/abs/2412.05270>`_, 2025.

  Args:
    learning_rate: a scalar or schedule.
    rank: projection rank, at most the smaller dimension of every matrix.
    scale_type: ``'channel'`` (APOLLO) or ``'tensor'`` (APOLLO-Mini).
    scale: factor whose square root multiplies the update.
    update_proj_gap: steps between basis refreshes.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam's epsilon.
    norm_growth_limit: limiter threshold γ, or ``None``.
    projection: ``'random'`` or ``'svd'``.
    seed: seed of the random bases.
    vector_mode: ``'adam'`` or ``'apollo'`` treatment of vectors.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask (pytree or callable).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.apollo(1e-3, rank=8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return optax.chain(
      scale_by_apollo(rank=rank, scale_type=scale_type, scale=scale,
                      update_proj_gap=update_proj_gap, b1=b1, b2=b2, eps=eps,
                      norm_growth_limit=norm_growth_limit,
                      projection=projection, seed=seed,
                      vector_mode=vector_mode),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    scale: float = 128.0,
    update_proj_gap: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    norm_growth_limit: float | None = 1.01,
    seed: int = 0,
    vector_mode: str = "adam",
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO-Mini: rank-1 random projection with one tensor-wise factor.

  ``apollo(rank=1, scale_type='tensor', scale=128)``: the state of a
  ``(m, n)`` matrix is two vectors of length ``min(m, n)``.

  Args:
    learning_rate: a scalar or schedule.
    scale: factor whose square root multiplies the update (128 in the paper).
    update_proj_gap: steps between basis refreshes.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam's epsilon.
    norm_growth_limit: limiter threshold γ, or ``None``.
    seed: seed of the random bases.
    vector_mode: ``'adam'`` (paper) or ``'apollo'`` (vectors as rank-1
      ``(1, d)`` matrices, two floats of state per vector).
    weight_decay: decoupled weight decay.
    mask: weight-decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.apollo_mini(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return apollo(learning_rate, rank=1, scale_type="tensor", scale=scale,
                update_proj_gap=update_proj_gap, b1=b1, b2=b2, eps=eps,
                norm_growth_limit=norm_growth_limit, projection="random",
                seed=seed, vector_mode=vector_mode, weight_decay=weight_decay,
                mask=mask)
