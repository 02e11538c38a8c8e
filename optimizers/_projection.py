"""Helpers shared by gradax's low-rank and subspace optimizers.

Conventions (the same as ``optax.contrib.galore``): a leaf with two or more
dimensions is viewed as a matrix ``(prod(shape[:-1]), shape[-1])``; its
projection acts on the longer side, so a rank-``r`` projected gradient has
shape ``(r, n)`` when ``m >= n`` ("left" projection, ``R = P^T G``) and
``(m, r)`` otherwise ("right" projection, ``R = G P``). ``P`` has orthonormal
(SVD) or random Gaussian columns.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gradax.optimizers import _tree
from gradax.optimizers._tree import check_range  # re-exported for modules here


def matrix_shape(shape) -> tuple[int, int] | None:
  """The ``(m, n)`` matrix view of a leaf shape, or ``None`` below 2 dims."""
  if len(shape) < 2:
    return None
  return math.prod(shape[:-1]), shape[-1]


def as_matrix(x: jax.Array) -> jax.Array:
  """Reshapes a leaf of two or more dimensions to its matrix view."""
  return x.reshape(matrix_shape(x.shape))


def is_left(shape) -> bool:
  """Whether the projection of a ``(m, n)`` matrix acts on its rows."""
  m, n = shape
  return m >= n


def projected_shape(shape, rank: int) -> tuple[int, int]:
  """Shape of the rank-``rank`` projection of a ``(m, n)`` matrix."""
  m, n = shape
  return (rank, n) if is_left(shape) else (m, rank)


def basis_shape(shape, rank: int) -> tuple[int, int]:
  """Shape of the basis ``P`` that projects a ``(m, n)`` matrix."""
  m, n = shape
  return (max(m, n), rank)


def check_rank(rank: int, params: Any, name: str = "rank") -> None:
  """Raises ``ValueError`` when ``rank`` exceeds a matrix leaf's dimensions.

  Args:
    rank: the requested rank.
    params: the parameter pytree.
    name: the argument name used in the message.
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"{name} must be a positive int, got {rank!r}.")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    mshape = matrix_shape(jnp.shape(leaf))
    if mshape is not None and rank > min(mshape):
      raise ValueError(
          f"{name}={rank} exceeds the smaller dimension {min(mshape)} of the "
          f"parameter {jax.tree_util.keystr(path)} with matrix shape "
          f"{mshape}; use a rank between 1 and {min(mshape)}.")


def svd_basis(g: jax.Array, rank: int) -> jax.Array:
  """Top-``rank`` singular vectors of ``g`` on its longer side, in f32.

  Args:
    g: a ``(m, n)`` matrix.
    rank: number of singular vectors kept.

  Returns:
    ``P`` of shape ``(max(m, n), rank)`` with orthonormal columns.
  """
  g = g.astype(jnp.float32)
  u, _, vh = jnp.linalg.svd(g, full_matrices=False)
  if is_left(g.shape):
    return u[:, :rank]
  return vh[:rank, :].T


def gaussian_basis(key: jax.Array, shape, rank: int) -> jax.Array:
  """A random Gaussian basis with entries N(0, 1/rank), so E‖PᵀG‖² = ‖G‖².

  Args:
    key: PRNG key.
    shape: the ``(m, n)`` matrix shape that is projected.
    rank: number of columns.

  Returns:
    ``P`` of shape ``(max(m, n), rank)`` in f32.
  """
  return jax.random.normal(key, basis_shape(shape, rank),
                           jnp.float32) / math.sqrt(rank)


def project(g: jax.Array, p: jax.Array) -> jax.Array:
  """``PᵀG`` (left) or ``GP`` (right) for a ``(m, n)`` matrix ``g``."""
  if is_left(g.shape):
    return p.T @ g
  return g @ p


def project_back(r: jax.Array, p: jax.Array, shape) -> jax.Array:
  """``P R`` (left) or ``R Pᵀ`` (right): a ``(m, n)`` matrix again."""
  if is_left(shape):
    return p @ r
  return r @ p.T


def leaf_key(seed: jax.Array, leaf_index: int, epoch: jax.Array) -> jax.Array:
  """A PRNG key for one leaf and one projection epoch, from an int seed."""
  key = jax.random.fold_in(jax.random.key(seed), leaf_index)
  return jax.random.fold_in(key, epoch)


def keep_sharding(new: Any, old: Any) -> Any:
  """Reshards each leaf of ``new`` to the sharding type of ``old``.

  Under an explicit mesh, state computed from sharded gradients (e.g. a
  projected moment) can acquire a sharding its ``init`` value did not have;
  pinning it keeps state types stable across steps. Outside an explicit mesh
  this is the identity.
  """
  def pin(n, o):
    try:
      want = jax.typeof(o).sharding
      have = jax.typeof(n).sharding
    except AttributeError:
      return n
    mesh = getattr(want, "mesh", None)
    if mesh is None or mesh.empty or not any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      return n
    if have.spec == want.spec:
      return n
    return jax.sharding.reshard(n, want.spec)
  return jax.tree.map(pin, new, old)


def check_positive_int(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an int of at least 1.

  Traced values (e.g. under ``optax.inject_hyperparams``) are not checked.
  """
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, jax.Array) and value.ndim == 0 and jnp.issubdtype(
      value.dtype, jnp.integer):
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}.")


def adam_moments(g, mu, nu, b1, b2):
  """One step of Adam's moment EMAs, in the moments' dtype."""
  mu = b1 * mu + (1.0 - b1) * g
  nu = b2 * nu + (1.0 - b2) * jnp.square(g)
  return mu, nu


def adam_direction(mu, nu, count, b1, b2, eps):
  """Bias-corrected Adam direction ``m̂ / (sqrt(v̂) + eps)`` at step ``count``.

  ``count`` is the 1-based step number (an int32 array).
  """
  t = count.astype(jnp.float32)
  mu_hat = mu / (1.0 - jnp.asarray(b1, jnp.float32) ** t)
  nu_hat = nu / (1.0 - jnp.asarray(b2, jnp.float32) ** t)
  return mu_hat / (jnp.sqrt(nu_hat) + eps)


def _explicit_spec(x):
  """The PartitionSpec of ``x`` if sharded over Explicit mesh axes."""
  sharding = _tree.explicit_sharding(x)
  return None if sharding is None else sharding.spec


def replicate(tree: Any) -> Any:
  """Gathers every leaf sharded over Explicit mesh axes to a replicated one.

  The subspace optimizers here (SVD, top-k, row selection, subset norms)
  compute per leaf on the whole matrix; under an explicit mesh they first
  gather the gradient, then :func:`restore` the update to the gradient's
  sharding. Outside an explicit mesh this is the identity.
  """
  def one(x):
    if _explicit_spec(x) is None:
      return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  return jax.tree.map(one, tree)


def restore(tree: Any, like: Any) -> Any:
  """Reshards each leaf of ``tree`` to the sharding of ``like``'s leaf."""
  def one(x, ref):
    spec = _explicit_spec(ref)
    if spec is None or _explicit_spec(x) == spec:
      return x
    return jax.sharding.reshard(x, spec)
  return jax.tree.map(one, tree, like)


def map_leaves(leaf_fn: Callable[..., tuple], updates: Any,
               *fields: Any) -> tuple[Any, tuple[Any, ...]]:
  """The per-leaf loop of the subspace optimizers.

  Calls ``leaf_fn(index, g, *field_leaves) -> (u, *new_field_leaves)`` for
  every gradient leaf ``g`` (gathered first, see :func:`replicate`) with the
  matching leaves of each state tree in ``fields`` (flattened up to the
  gradients' structure, so a field leaf may itself be a small pytree).

  Returns:
    ``(new_updates, new_fields)``: the updates in the gradients' shardings
    (:func:`restore`) and one new tree per field.
  """
  leaves, treedef = jax.tree.flatten(replicate(updates))
  per_field = [treedef.flatten_up_to(f) for f in fields]
  out = [leaf_fn(i, g, *vals)
         for i, (g, *vals) in enumerate(zip(leaves, *per_field))]
  cols = list(zip(*out)) if out else [[]] * (len(fields) + 1)
  new_updates = restore(treedef.unflatten(list(cols[0])), updates)
  return new_updates, tuple(treedef.unflatten(list(c)) for c in cols[1:])


def adam_leaf(g, mu, nu, count, b1, b2, eps):
  """Plain Adam for a leaf kept whole (vectors, scalars): ``(u, mu, nu)``.

  ``u`` is in ``g``'s dtype; the moments stay float32.
  """
  mu, nu = adam_moments(g.astype(jnp.float32), mu, nu, b1, b2)
  return adam_direction(mu, nu, count, b1, b2, eps).astype(g.dtype), mu, nu
