"""Grass: Adam state on a structured (row-selection) projection.

Muhamed et al., `Grass: Compute Efficient Low-Memory LLM Training with
Structured Sparse Gradients <https://arxiv.org/abs/2406.17660>`_, EMNLP 2024
(arXiv 2406.17660).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.optimizers import _projection as proj


class GrassState(NamedTuple):
  """State of :func:`scale_by_grass`.

  Attributes:
    count: steps taken, shape ``()``, int32.
    mu: Adam first moment: ``(rank, max(m, n))`` f32 per matrix leaf, the
      leaf's shape (f32) for vectors and scalars.
    nu: Adam second moment, same shapes.
    rows: selected rows of the shorter side, ``(rank,)`` int32 per matrix
      leaf (size 0 for vectors).
    row_scale: the selection's scale ``c_j``, ``(rank,)`` f32 per matrix leaf.
  """
  count: jax.Array
  mu: Any
  nu: Any
  rows: Any
  row_scale: Any


def select_rows(g: jax.Array, rank: int, method: str, key: jax.Array):
  """Chooses ``rank`` rows of ``g`` and their scales ``c``.

  ``top_norm``: the largest row norms, ``c = 1``. ``norm_sampling``: rows
  drawn with replacement with ``p_i ∝ ‖g_i‖²``, ``c = 1/sqrt(rank·p_i)``.
  ``uniform``: uniform with replacement, ``c = sqrt(rows/rank)``. The two
  sampling rules make ``E[P Pᵀ] = I`` (an unbiased projection).

  Args:
    g: ``(rows, cols)`` matrix.
    rank: number of rows.
    method: ``'top_norm'``, ``'norm_sampling'`` or ``'uniform'``.
    key: PRNG key for the sampling methods.

  Returns:
    ``(indices int32 (rank,), scales f32 (rank,))``.
  """
  n = g.shape[0]
  sq = jnp.sum(jnp.square(g.astype(jnp.float32)), axis=1)
  if method == "top_norm":
    _, idx = jax.lax.top_k(sq, rank)
    return idx.astype(jnp.int32), jnp.ones((rank,), jnp.float32)
  if method == "uniform":
    idx = jax.random.randint(key, (rank,), 0, n)
    return idx.astype(jnp.int32), jnp.full((rank,), (n / rank) ** 0.5,
                                           jnp.float32)
  total = jnp.sum(sq)
  probs = jnp.where(total > 0, sq / jnp.where(total > 0, total, 1.0), 1.0 / n)
  idx = jax.random.choice(key, n, (rank,), replace=True, p=probs)
  scale = 1.0 / jnp.sqrt(rank * jnp.maximum(probs[idx], 1e-30))
  return idx.astype(jnp.int32), scale


def scale_by_grass(
    rank: int = 1,
    update_proj_gap: int = 200,
    selection: str = "norm_sampling",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Grass: Adam on ``rank`` selected rows; the update is row-sparse.

  For each matrix leaf ``G``, viewed as ``(min(m, n), max(m, n))`` (the
  shorter side as rows, as in the paper and GaLore, which take ``m <= n``:
  the state is ``rank × max(m, n)`` and a selected row updates
  ``max(m, n)`` entries), every
  ``update_proj_gap`` steps a sparse projection ``P`` (one nonzero ``c_j`` per
  column, at row ``i_j``) is chosen by :func:`select_rows` and the moments
  restart. Then

  .. math::
    R = P^T G = (c_j G_{i_j,:})_j,\quad
    U = P\,\mathrm{Adam}(R),\ \text{i.e. } U_{i_j,:} \mathrel{+}= c_j
    \mathrm{Adam}(R)_j,

  and all other rows of ``U`` are zero. Vectors and scalars get plain Adam.

  Args:
    rank: rows kept per matrix, at most its smaller dimension.
    update_proj_gap: steps between re-selections (>= 1).
    selection: ``'norm_sampling'``, ``'top_norm'`` or ``'uniform'``.
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: Adam epsilon (>= 0).
    seed: seed of the sampling.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = optax.chain(scale_by_grass(rank=8), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  proj.check_positive_int("rank", rank)
  proj.check_positive_int("update_proj_gap", update_proj_gap)
  if selection not in ("norm_sampling", "top_norm", "uniform"):
    raise ValueError(
        "selection must be 'norm_sampling', 'top_norm' or 'uniform', got "
        f"{selection!r}.")
  proj.check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  proj.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  proj.check_range("eps", eps, 0.0, float("inf"))

  def init_fn(params):
    proj.check_rank(rank, params)

    def moment(p):
      mshape = proj.matrix_shape(p.shape)
      if mshape is None:
        return jnp.zeros(p.shape, jnp.float32)
      return jnp.zeros((rank, max(mshape)), jnp.float32)

    def sel(p, dtype):
      size = 0 if proj.matrix_shape(p.shape) is None else rank
      return jnp.zeros((size,), dtype)

    return GrassState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(moment, params),
        nu=jax.tree.map(moment, params),
        rows=jax.tree.map(lambda p: sel(p, jnp.int32), params),
        row_scale=jax.tree.map(lambda p: sel(p, jnp.float32), params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = optax.safe_int32_increment(state.count)
    epoch = state.count // update_proj_gap
    refresh = state.count % update_proj_gap == 0
    local_count = state.count % update_proj_gap + 1

    def leaf(i, g, mu, nu, rows, scale):
      mshape = proj.matrix_shape(g.shape)
      if mshape is None:
        return (*proj.adam_leaf(g, mu, nu, count, b1, b2, eps), rows, scale)
      # Rows are the shorter side (transpose when m > n).
      transpose = mshape[0] > mshape[1]
      g2 = g.astype(jnp.float32).reshape(mshape)
      g2 = g2.T if transpose else g2
      key = proj.leaf_key(seed, i, epoch)
      rows, scale = jax.lax.cond(
          refresh, lambda: select_rows(g2, rank, selection, key),
          lambda: (rows, scale))
      mu = jnp.where(refresh, 0.0, mu)
      nu = jnp.where(refresh, 0.0, nu)
      r = scale[:, None] * g2[rows]
      mu, nu = proj.adam_moments(r, mu, nu, b1, b2)
      a = proj.adam_direction(mu, nu, local_count, b1, b2, eps)
      u = jnp.zeros_like(g2).at[rows].add(scale[:, None] * a)
      u = u.T if transpose else u
      return u.reshape(g.shape).astype(g.dtype), mu, nu, rows, scale

    new_updates, fields = proj.map_leaves(
        leaf, updates, state.mu, state.nu, state.rows, state.row_scale)
    return new_updates, proj.keep_sharding(GrassState(count, *fields), state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def grass(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 1,
    update_proj_gap: int = 200,
    selection: str = "norm_sampling",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Grass optimizer: row-selection projection with Adam state.

  ``-lr * (Grass update + weight_decay * params)``; see
  :func:`scale_by_grass`. Muhamed et al., `Grass
  <https://arxiv.org/abs/2406.17660>`_, 2024.

  Args:
    learning_rate: a scalar or schedule.
    rank: rows kept per matrix.
    update_proj_gap: steps between re-selections.
    selection: ``'norm_sampling'``, ``'top_norm'`` or ``'uniform'``.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam epsilon.
    seed: seed of the sampling.
    weight_decay: decoupled weight decay.
    mask: weight-decay mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.grass(1e-3, rank=8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  return optax.chain(
      scale_by_grass(rank=rank, update_proj_gap=update_proj_gap,
                     selection=selection, b1=b1, b2=b2, eps=eps, seed=seed),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
