"""Compressed collectives: ``compressed_pmean`` with three reduction schedules.

ALGORITHMS.md §2.4 and §6.5. All communication runs inside ``jax.shard_map``
over a named axis (§3.12). Per-replica state (the server error) differs
between devices: at the jit level it carries a leading replica axis.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from gradax.distributed.compressors import Compressor

SCHEDULES = ("auto", "psum", "two_phase", "all_gather")


class PmeanState(NamedTuple):
  """State of :func:`compressed_pmean` for one tensor.

  Attributes:
    count: calls so far; folds into the PRNG key. shape=(), int32.
    compressor: the compressor's own state (e.g. PowerSGD's Q).
    server_error: two-phase server error of this device's chunk, f32, shape
      (chunk,) when the state was built inside ``shard_map``; shape
      (padded size,) (the whole tensor, each device using its own chunk of
      it) when built with an unbound axis, e.g. by an optimizer's ``init``
      outside ``shard_map``; (0,) for other schedules. It differs per device,
      so at the jit level the state carries a leading replica axis like all
      per-replica state (``gradax.distributed.sharding.stack_replicas``).
  """
  count: jax.Array
  compressor: Any
  server_error: jax.Array


def axis_size(axis_name: str | None, who: str = "this function") -> int:
  """Size of a bound mesh axis, or 1 for ``None``.

  Raises:
    ValueError: if ``axis_name`` is not bound, i.e. the caller is not inside
      ``jax.shard_map`` over that axis.
  """
  if axis_name is None:
    return 1
  try:
    return int(lax.axis_size(axis_name))
  except NameError:
    raise ValueError(
        f"{who} was given axis_name={axis_name!r} but no mesh axis of that "
        f"name is bound: call it inside jax.shard_map over the "
        f"{axis_name!r} axis (or pass axis_name=None for one replica)."
    ) from None


def _resolve(schedule: str, compressor: Compressor) -> str:
  if schedule not in SCHEDULES:
    raise ValueError(
        f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
  if schedule == "auto":
    return "psum" if compressor.linear else "two_phase"
  if schedule == "psum" and not compressor.linear:
    raise ValueError(
        f"schedule='psum' needs a linear compressor; {compressor.name!r} is "
        "not linear (its integer payloads would wrap or be meaningless when "
        "summed). Use 'two_phase' or 'all_gather'.")
  return schedule


def _chunk_len(d: int, n: int, multiple: int) -> int:
  c = -(-d // n)
  return -(-c // multiple) * multiple


def _leaf_init(x, compressor, n, schedule):
  shape = tuple(jnp.shape(x))
  err = jnp.zeros((0,), jnp.float32)
  if schedule == "two_phase":
    c = _chunk_len(max(1, math.prod(shape)), n, compressor.chunk_multiple)
    err = jnp.zeros((c,), jnp.float32)
  return PmeanState(count=jnp.zeros((), jnp.int32),
                    compressor=compressor.init(shape), server_error=err)


def compressed_pmean_init(x, compressor: Compressor, axis_name: str | None,
                          schedule: str = "auto", *,
                          allow_unbound: bool = False) -> Any:
  """Creates the state of :func:`compressed_pmean` for a pytree ``x``.

  Call it where ``compressed_pmean`` will be called (inside ``shard_map``
  over ``axis_name``), so the two-phase chunk length matches the axis size.

  Args:
    x: a pytree of arrays (or shape-dtype structs) to be averaged.
    compressor: a :class:`~gradax.distributed.Compressor`.
    axis_name: the mesh axis, or None for one replica.
    schedule: see :func:`compressed_pmean`.
    allow_unbound: if true and ``axis_name`` is not bound (an optimizer's
      ``init`` outside ``shard_map``), build a whole-tensor server error
      instead of raising.

  Returns:
    A pytree with one :class:`PmeanState` per leaf of ``x``.
  """
  schedule = _resolve(schedule, compressor)
  if allow_unbound and axis_name is not None and not is_bound(axis_name):
    return jax.tree.map(lambda a: _leaf_init(a, compressor, 1, schedule), x)
  n = axis_size(axis_name, "compressed_pmean_init")
  state = jax.tree.map(lambda a: _leaf_init(a, compressor, n, schedule), x)
  if axis_name is None:
    return state
  # The server error differs per device: mark it varying so it can be a
  # loop carry inside shard_map.
  return jax.tree.map(
      lambda st: st._replace(server_error=as_varying(st.server_error,
                                                     axis_name)),
      state, is_leaf=lambda s: isinstance(s, PmeanState))


def is_bound(axis_name: str) -> bool:
  """Whether a mesh axis of this name is bound (we are inside shard_map)."""
  try:
    lax.axis_size(axis_name)
    return True
  except NameError:
    return False


def as_varying(x, axis_name: str):
  """Marks ``x`` as varying over ``axis_name`` (a no-op if it already is)."""
  vma = getattr(jax.typeof(x), "vma", frozenset())
  if axis_name in vma:
    return x
  return lax.pcast(x, axis_name, to="varying")


def _explicit_spec(x):
  """``x``'s PartitionSpec when it is sharded over an explicit mesh axis."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if spec is None or all(s is None for s in spec):
    return None
  return spec


def unshard(x):
  """``x`` replicated over the explicit mesh axes it is sharded on.

  Compressors see whole tensors (a scale over all of ``x``, a flat bit
  vector), and under an explicit mesh (``AxisType.Explicit``) flattening a
  sharded array has no implied sharding. Inside ``shard_map`` over a fully
  manual mesh nothing is sharded, so this is a no-op there and adds no bytes.
  """
  return x if _explicit_spec(x) is None else jax.sharding.reshard(x, P())


def shard_like(y, ref):
  """``y`` (shaped like ``ref``) given ``ref``'s explicit-mesh sharding."""
  spec = _explicit_spec(ref)
  return y if spec is None else jax.sharding.reshard(y, spec)


def _all_to_all(tree, axis_name):
  return jax.tree.map(
      lambda a: lax.all_to_all(a, axis_name, 0, 0, tiled=True), tree)


def _all_gather(tree, axis_name):
  return jax.tree.map(
      lambda a: lax.all_gather(a, axis_name, tiled=False, to="invarying"),
      tree)


def _leaf_pmean(x, st: PmeanState, compressor, axis_name, schedule, key,
                server_error):
  ref = x
  mean, local, st = _leaf_pmean_whole(unshard(x), st, compressor, axis_name,
                                      schedule, key, server_error)
  return shard_like(mean, ref), shard_like(local, ref), st


def _leaf_pmean_whole(x, st: PmeanState, compressor, axis_name, schedule,
                      key, server_error):
  n = axis_size(axis_name, "compressed_pmean")
  shape = x.shape
  d = max(1, math.prod(shape))
  private = compressor.randomness == "private"
  if private and axis_name is not None:
    key = jax.random.fold_in(key, lax.axis_index(axis_name))
  k_worker, k_server = jax.random.split(key)
  if compressor.randomness == "none":
    k_worker = k_server = None
  new_count = st.count + 1

  if schedule == "psum":
    if compressor.reduce is not None:
      if axis_name is None:
        payload, cst = compressor.encode(x, st.compressor, k_worker)
        mean = compressor.decode(payload, shape)
      else:
        mean, cst = compressor.reduce(x, st.compressor, k_worker, axis_name)
      return mean, mean, st._replace(count=new_count, compressor=cst)
    payload, cst = compressor.encode(x, st.compressor, k_worker)
    local = compressor.decode(payload, shape)
    if axis_name is not None:
      payload = compressor.sum_payloads(payload, axis_name)
    mean = compressor.decode(payload, shape) / n
    return mean, local, st._replace(count=new_count, compressor=cst)

  if schedule == "all_gather":
    payload, cst = compressor.encode(x, st.compressor, k_worker)
    local = compressor.decode(payload, shape)
    if axis_name is None:
      mean = local
    else:
      gathered = _all_gather(payload, axis_name)
      mean = jnp.mean(compressor.decode_rows(gathered, shape), axis=0)
    return mean, local, st._replace(count=new_count, compressor=cst)

  # two_phase: all_to_all of compressed chunks, f32 reduce + server error,
  # re-compress, all_gather.
  c = _chunk_len(d, n, compressor.chunk_multiple)
  flat = jnp.ravel(x).astype(jnp.float32)
  rows = jnp.pad(flat, (0, n * c - d)).reshape(n, c)
  payload, cst = compressor.encode_rows(rows, st.compressor, k_worker)
  local = compressor.decode_rows(payload, (c,)).reshape(-1)[:d].reshape(shape)
  recv = payload if axis_name is None else _all_to_all(payload, axis_name)
  chunk = jnp.mean(compressor.decode_rows(recv, (c,)), axis=0)
  stored = st.server_error.shape[0]
  if stored == c:
    err = st.server_error
  else:  # whole-tensor buffer: this device's chunk of it
    if stored < d:
      raise ValueError(
          f"server error buffer of length {stored} fits neither the chunk "
          f"length {c} nor the tensor size {d}; rebuild the state.")
    full = jnp.pad(st.server_error, (0, max(0, n * c - stored)))
    r = 0 if axis_name is None else lax.axis_index(axis_name)
    err = lax.dynamic_slice_in_dim(full, r * c, c)
  chunk = chunk + err
  spay, cst = compressor.encode(chunk, cst, k_server)
  if server_error:
    new_err = chunk - compressor.decode(spay, (c,))
  else:
    new_err = jnp.zeros_like(chunk)
  if axis_name is None:
    out = compressor.decode(spay, (c,))
  else:
    gathered = _all_gather(spay, axis_name)
    out = compressor.decode_rows(gathered, (c,)).reshape(-1)
  mean = out[:d].reshape(shape)
  if stored != c:
    new_err = lax.dynamic_update_slice_in_dim(full, new_err, r * c, 0)[:stored]
  return mean, local, PmeanState(new_count, cst, new_err)


def compressed_pmean(x, compressor: Compressor, axis_name: str | None,
                     state, schedule: str = "auto", *, key=None,
                     seed: int = 0, server_error: bool = True,
                     return_local: bool = False):
  """Mean over a mesh axis of a pytree, sent through a compressor.

  Schedules (ALGORITHMS.md §2.4), per tensor of d elements on n devices:

  * ``psum``: linear compressors only; payloads are summed, then decoded and
    divided by n (PowerSGD runs its own two psums). Wire: 2(n-1)/n * payload.
  * ``two_phase``: the tensor is split into n chunks, each compressed;
    ``all_to_all`` gives device r every worker's chunk r; it averages them in
    f32, adds its server error e_r, re-compresses
    (e_r <- m_r + e_r - C(m_r + e_r)) and ``all_gather`` s the result.
    Wire: about 2(n-1)/n * payload. With :func:`~gradax.distributed.onebit`
    this is DeepSpeed's 1-bit ``compressed_allreduce`` (server error here;
    the worker error belongs to the error-feedback transform).
  * ``all_gather``: every worker's payload goes to every worker, which
    decodes and averages; wire (n-1) * payload, growing with n.
  * ``auto``: ``psum`` for linear compressors, else ``two_phase``.

  Every device gets the same estimate of the mean. Never psums integer codes
  (they wrap, §6.5).

  Args:
    x: a pytree of float arrays (this device's values). A leaf sharded
      over explicit mesh axes (outside ``shard_map``) is compressed
      whole (replicated first, see :func:`unshard`); ``mean`` and
      ``local`` keep its sharding.
    compressor: a :class:`~gradax.distributed.Compressor`.
    axis_name: the mesh axis, bound by an enclosing ``jax.shard_map``; None
      means one replica (no collective; compression still applies).
    state: from :func:`compressed_pmean_init`.
    schedule: ``"auto"``, ``"psum"``, ``"two_phase"`` or ``"all_gather"``.
    key: optional PRNG key; by default ``fold_in(key(seed), count)``, the same
      on every device (shared randomness), with the device index folded in for
      compressors with private randomness.
    seed: seed of the default key.
    server_error: keep the two-phase server error (DeepSpeed does).
    return_local: also return this device's decoded message C(x) (what an
      error-feedback rule subtracts).

  Returns:
    ``(mean, new_state)``, or ``(mean, local, new_state)`` with
    ``return_local``; ``mean`` and ``local`` are float32 pytrees like ``x``.

  Raises:
    ValueError: for an unknown schedule, ``psum`` with a non-linear
      compressor, or an axis name that is not bound by ``shard_map``.

  Example:
    >>> comp = gradax.distributed.int8()
    >>> s = compressed_pmean_init(g, comp, "data")         # inside shard_map
    >>> g_mean, s = compressed_pmean(g, comp, "data", s)   # inside shard_map
  """
  schedule = _resolve(schedule, compressor)
  axis_size(axis_name, "compressed_pmean")
  leaves, treedef = jax.tree.flatten(x)
  states = treedef.flatten_up_to(state)
  means, locals_, new_states = [], [], []
  for i, (leaf, st) in enumerate(zip(leaves, states)):
    if key is None:
      k = jax.random.fold_in(jax.random.key(seed), st.count)
    else:
      k = key
    k = jax.random.fold_in(k, i)
    m, loc, ns = _leaf_pmean(jnp.asarray(leaf), st, compressor, axis_name,
                             schedule, k, server_error)
    means.append(m)
    locals_.append(loc)
    new_states.append(ns)
  mean = treedef.unflatten(means)
  new_state = treedef.unflatten(new_states)
  if return_local:
    return mean, treedef.unflatten(locals_), new_state
  return mean, new_state
