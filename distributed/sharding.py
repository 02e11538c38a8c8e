"""Sharding rules for params, gradients and optimizer state, and placement helpers.

Three rules cover the usual layouts (ALGORITHMS.md §3.12):

* ``"replicated"``: every device holds the whole leaf, ``P()``.
* ``"sharded"`` (ZeRO / FSDP): each leaf is split over the data axis along its
  largest dimension that the axis size divides; leaves with no such dimension
  (scalars, odd shapes) stay replicated.
* a :class:`ShardingPlan` gives params, grads and optimizer state a rule each,
  in the style of AMSP (Chen et al. 2023, arXiv 2311.00257): ZeRO-1 shards the
  optimizer state only, ZeRO-2 also the gradients, ZeRO-3/FSDP everything.

Per-replica state (local params and inner optimizer states of local-update
algorithms, error-feedback buffers, DeMo momenta) carries an explicit leading
replica axis at the ``jit`` level, sharded ``P(axis)``; inside ``shard_map``
each device sees a leading axis of size 1, which :func:`local_view` drops and
:func:`replica_view` restores.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

RULES = ("replicated", "sharded")


def _check_rule(rule: str, arg: str = "rule") -> str:
  if rule not in RULES:
    raise ValueError(
        f"{arg}={rule!r} is not a sharding rule; allowed rules are "
        f"{', '.join(repr(r) for r in RULES)}.")
  return rule


def axis_size(mesh: Mesh, axis_name: str) -> int:
  """Size of ``axis_name`` in ``mesh``; a clear error if the axis is absent."""
  if axis_name not in mesh.shape:
    raise ValueError(
        f"axis_name={axis_name!r} is not an axis of the mesh, whose axes are "
        f"{tuple(mesh.shape)}.")
  return int(mesh.shape[axis_name])


class ShardingPlan(NamedTuple):
  """One rule per kind of state (AMSP-style).

  Attributes:
    params: rule for the parameters.
    grads: rule for the (reduced) gradients.
    opt_state: rule for the optimizer state.
  """
  params: str = "replicated"
  grads: str = "replicated"
  opt_state: str = "replicated"

  def validate(self) -> "ShardingPlan":
    for name, rule in zip(self._fields, self):
      _check_rule(rule, f"{name}")
    return self


def zero_plan(stage: int) -> ShardingPlan:
  """The ZeRO stage as a :class:`ShardingPlan` (0 = plain data parallel).

  Args:
    stage: 0 replicates everything; 1 shards the optimizer state; 2 also the
      gradients; 3 (FSDP) also the parameters.

  Returns:
    The plan.
  """
  if stage not in (0, 1, 2, 3):
    raise ValueError(f"stage={stage!r} is not a ZeRO stage; allowed: 0, 1, 2, 3.")
  s = ["replicated", "sharded"]
  return ShardingPlan(params=s[stage >= 3], grads=s[stage >= 2],
                      opt_state=s[stage >= 1])


def shard_dim(shape: tuple[int, ...], n: int) -> int | None:
  """The dimension a ``"sharded"`` leaf of ``shape`` is split along, or None.

  The largest dimension divisible by ``n`` (the first one on ties); ``None``
  when no dimension is divisible or ``n == 1``.
  """
  if n == 1:
    return None
  best = None
  for i, d in enumerate(shape):
    if d % n == 0 and d > 0 and (best is None or d > shape[best]):
      best = i
  return best


def leaf_spec(shape: tuple[int, ...], rule: str, axis_name: str, n: int) -> P:
  """PartitionSpec of one leaf under ``rule``."""
  _check_rule(rule)
  if rule == "replicated":
    return P()
  dim = shard_dim(tuple(shape), n)
  if dim is None:
    return P()
  return P(*([None] * dim + [axis_name]))


def specs(tree: Any, mesh: Mesh, rule: str, axis_name: str = "data") -> Any:
  """PartitionSpecs for every leaf of ``tree`` under ``rule``.

  Args:
    tree: a pytree of arrays (or ``jax.ShapeDtypeStruct``s).
    mesh: the mesh.
    rule: ``"replicated"`` or ``"sharded"``.
    axis_name: the data axis that ``"sharded"`` splits over.

  Returns:
    A pytree of ``PartitionSpec`` with the structure of ``tree``.

  Example:
    >>> mesh = make_mesh("data=8")
    >>> specs({"w": jnp.zeros((16, 3))}, mesh, "sharded")
    {'w': PartitionSpec('data',)}
  """
  _check_rule(rule)
  n = axis_size(mesh, axis_name)
  return jax.tree.map(lambda x: leaf_spec(np.shape(x), rule, axis_name, n),
                      tree)


def place(tree: Any, mesh: Mesh, rule_or_specs: Any = "replicated",
          axis_name: str = "data") -> Any:
  """Puts ``tree`` on ``mesh`` following a rule name or a pytree of specs.

  Args:
    tree: pytree of arrays.
    mesh: the mesh.
    rule_or_specs: ``"replicated"``, ``"sharded"``, or a pytree of
      ``PartitionSpec`` matching ``tree``.
    axis_name: data axis used by ``"sharded"``.

  Returns:
    The placed pytree (global ``jax.Array``s; works across processes when
    every process passes the same host values).
  """
  if isinstance(rule_or_specs, str):
    rule_or_specs = specs(tree, mesh, rule_or_specs, axis_name)
  return jax.tree.map(
      lambda x, s: _put(x, NamedSharding(mesh, s)), tree, rule_or_specs,
      is_leaf=lambda s: isinstance(s, P))


def _put(x, sharding: NamedSharding):
  if jax.process_count() == 1 or (isinstance(x, jax.Array)
                                  and x.is_fully_addressable is False):
    return jax.device_put(x, sharding)
  # Multi-process: every process holds the full host value and keeps its
  # addressable pieces.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda idx: host[idx])


def replicated(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` replicated on ``mesh``."""
  return place(tree, mesh, "replicated")


def stack_replicas(tree: Any, n: int) -> Any:
  """Gives every leaf a leading replica axis of size ``n`` (copies)."""
  if n < 1:
    raise ValueError(f"n={n!r} replicas; need n >= 1.")
  return jax.tree.map(
      lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), tree)


def per_replica(tree: Any, mesh: Mesh, axis_name: str = "data",
                stacked: bool = False) -> Any:
  """Places per-replica state: a leading replica axis sharded ``P(axis_name)``.

  Args:
    tree: pytree of arrays, either one replica's value (copied to all replicas)
      or, with ``stacked=True``, arrays that already have the leading axis.
    mesh: the mesh.
    axis_name: the replica axis.
    stacked: whether ``tree`` already carries the leading axis.

  Returns:
    The placed pytree; leaf shapes are ``(n, *shape)``.
  """
  n = axis_size(mesh, axis_name)
  if stacked:
    for x in jax.tree.leaves(tree):
      if jnp.ndim(x) == 0 or jnp.shape(x)[0] != n:
        raise ValueError(
            f"per-replica leaf of shape {jnp.shape(x)} needs a leading axis of "
            f"size {n} (the size of mesh axis {axis_name!r}).")
  else:
    tree = stack_replicas(tree, n)
  return place(tree, mesh, jax.tree.map(lambda _: P(axis_name), tree),
               axis_name)


def replica_specs(tree: Any, axis_name: str = "data") -> Any:
  """``P(axis_name)`` for every leaf: the spec of per-replica state."""
  return jax.tree.map(lambda _: P(axis_name), tree)


def local_view(tree: Any) -> Any:
  """Inside ``shard_map``: drops the size-1 leading replica axis."""
  return jax.tree.map(lambda x: x[0], tree)


def replica_view(tree: Any) -> Any:
  """Inside ``shard_map``: restores the size-1 leading replica axis."""
  return jax.tree.map(lambda x: x[None], tree)


def to_host(tree: Any) -> Any:
  """Host NumPy copies of global arrays, gathering across processes if needed."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def replica(tree: Any, i: int) -> Any:
  """Replica ``i`` of per-replica state, as host NumPy arrays."""
  return jax.tree.map(lambda x: x[i], to_host(tree))


def bytes_per_device(tree: Any) -> int:
  """Bytes of ``tree`` stored on the first addressable device.

  For a replicated leaf that is its full size; for a leaf sharded ``n`` ways,
  1/n of it.
  """
  total = 0
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array):
      dev = x.addressable_shards[0].device
      total += sum(s.data.nbytes for s in x.addressable_shards
                   if s.device == dev)
    else:
      total += np.asarray(x).nbytes
  return total
