"""Data-parallel training steps on a mesh: reducers, ZeRO sharding, micro-batches.

``data_parallel(loss_fn, optimizer, mesh, reducer)`` returns a
:class:`TrainAlgorithm` whose ``step`` is one jitted ``shard_map`` program over
the data axis:

    g_i = (1/k) Σ_j ∇L(θ; micro-batch j of replica i)        (local, k micro-batches)
    ḡ   = R(g_1, ..., g_n)                                    (the reducer)
    θ  ← θ + U(ḡ, s)                                          (the optimizer)

The reducer ``R`` is an exact mean (one f32 all-reduce), any compressor through
``compressed_pmean``, or a robust aggregator over all-gathered gradients.
With ``reducer=None`` the optimizer itself communicates (it was built with
``axis_name``, as 1-bit Adam is): it receives the local gradient and its state
carries a leading replica axis.

A :class:`~gradax.distributed.sharding.ShardingPlan` shards the optimizer state
(ZeRO-1), the gradients (ZeRO-2, reduce-scatter instead of all-reduce) and the
parameters (ZeRO-3 / FSDP, all-gather before the forward pass) over the data
axis. Sharded optimizer updates are computed on parameter slices, so ZeRO is
exact only for element-wise optimizers (SGD, Adam, Lion, ...).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gradax.distributed import sharding as sh


class TrainAlgorithm(NamedTuple):
  """The uniform interface every distributed training algorithm returns.

  Attributes:
    name: registry name, e.g. ``"diloco"``.
    init: ``init(params) -> state``; ``params`` is one copy of the model
      parameters (host or device arrays); the state is placed on the mesh.
    step: ``step(state, batch) -> (state, metrics)``; ``batch`` is the global
      batch (leading axis = global batch size, divisible by the number of
      replicas); ``metrics`` is a dict of scalars (device or host) with at
      least ``"loss"`` (mean training loss over replicas, before the update).
      Algorithms whose step has no collective to carry the loss return a
      host value (they block on the step).
    eval_params: ``eval_params(state) -> params``: the parameters to evaluate
      (the global/outer parameters for local-update algorithms).
    bytes_per_step: ``bytes_per_step(params) -> float``: bytes each device
      sends per training step, averaged over a sync period, under the ring
      model of ALGORITHMS.md §2.4 (f32 data-parallel = 2(n-1)/n·4d).
    mesh: the mesh the algorithm runs on.
    axis_name: the replica (data) axis.
    round: optional ``round(state, batches) -> (state, metrics)`` running
      ``period`` steps as one compiled program; ``batches`` stacks ``period``
      global batches on a new leading axis. ``None`` when not offered.
    period: steps per ``round`` (the sync period H of local-update methods;
      1 for algorithms that communicate every step).
  """
  name: str
  init: Callable[[Any], Any]
  step: Callable[[Any, Any], tuple[Any, dict]]
  eval_params: Callable[[Any], Any]
  bytes_per_step: Callable[[Any], float]
  mesh: Mesh
  axis_name: str = "data"
  round: Callable[[Any, Any], tuple[Any, dict]] | None = None
  period: int = 1


# --------------------------------------------------------------------------
# Shared helpers for step builders.


def num_elements(tree: Any) -> int:
  """Number of scalars in a pytree."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64)
                 for x in jax.tree.leaves(tree)))


def cached_builder(build: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """Memoises ``build(abstract_params)`` by the params' structure, shapes and
  dtypes, so a step builder compiles once per model signature.

  Args:
    build: ``build(params)`` taking a tree of ``jax.ShapeDtypeStruct``.

  Returns:
    ``get(params)``: ``build``'s result for params of that signature (params
    may be arrays or shape/dtype structs).
  """
  cache = {}

  def get(params):
    key = jax.tree.structure(params), tuple(
        (np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(params))
    if key not in cache:
      cache[key] = build(jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
          params))
    return cache[key]

  return get


def one_replica(per_replica: Any) -> Any:
  """Shape/dtype structs of one replica of a tree with a leading replica axis."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                      per_replica)


def ring_allreduce_bytes(nbytes: float, n: int) -> float:
  """Per-device bytes sent by a ring all-reduce of ``nbytes`` over ``n``."""
  return 2.0 * (n - 1) / n * nbytes


def place_batch(batch: Any, mesh: Mesh, axis_name: str = "data") -> Any:
  """Shards a global batch over ``axis_name`` along its leading axis."""
  n = sh.axis_size(mesh, axis_name)
  for x in jax.tree.leaves(batch):
    if np.ndim(x) == 0 or np.shape(x)[0] % n:
      raise ValueError(
          f"batch leaf of shape {np.shape(x)}: the leading (batch) axis must "
          f"be divisible by the {n} replicas of mesh axis {axis_name!r}.")
  return sh.place(batch, mesh, jax.tree.map(lambda _: P(axis_name), batch))


def local_grad(loss_fn: Callable, params: Any, batch: Any,
               microbatches: int = 1) -> tuple[jax.Array, Any]:
  """Mean loss and gradient over ``microbatches`` slices of a local batch.

  Accumulates in f32 with a ``lax.scan`` so activation memory is that of one
  micro-batch.
  """
  if microbatches == 1:
    return jax.value_and_grad(loss_fn)(params, batch)
  for x in jax.tree.leaves(batch):
    if x.shape[0] % microbatches:
      raise ValueError(
          f"microbatches={microbatches} does not divide the per-replica batch "
          f"size {x.shape[0]}.")
  mb = jax.tree.map(
      lambda x: x.reshape((microbatches, x.shape[0] // microbatches)
                          + x.shape[1:]), batch)

  def body(carry, b):
    loss, g = jax.value_and_grad(loss_fn)(params, b)
    acc_l, acc_g = carry
    return (acc_l + loss, jax.tree.map(
        lambda a, x: a + x.astype(a.dtype), acc_g, g)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss, g), _ = lax.scan(body, (jnp.zeros((), jnp.float32), zeros), mb)
  g = jax.tree.map(lambda a, p: (a / microbatches).astype(p.dtype), g, params)
  return loss / microbatches, g


def _check_microbatches(microbatches: int) -> int:
  if not isinstance(microbatches, (int, np.integer)) or microbatches < 1:
    raise ValueError(
        f"microbatches={microbatches!r}; must be an integer >= 1.")
  return int(microbatches)


# --------------------------------------------------------------------------
# Reducers.


class Reducer(NamedTuple):
  """A gradient reduction over the data axis, called inside ``shard_map``.

  Attributes:
    name: short name.
    init: ``init(flat, axis_name) -> state``: one replica's state (e.g.
      server error), given the flattened f32 vector; called inside
      ``shard_map`` (see :func:`init_per_replica`).
    reduce: ``reduce(flat, state, axis_name) -> (mean_flat, state)``.
    nbytes: ``nbytes(d, n) -> float``: per-device bytes sent to reduce a
      vector of ``d`` f32 values over ``n`` replicas (ring model, §2.4).
  """
  name: str
  init: Callable[[jax.Array, str], Any]
  reduce: Callable[[jax.Array, Any, str], tuple[jax.Array, Any]]
  nbytes: Callable[[int, int], float]


def init_per_replica(fn: Callable[..., Any], mesh: Mesh,
                     axis_name: str = "data", *args: Any) -> Any:
  """Runs ``fn(*args)`` inside ``shard_map`` over ``axis_name``; stacks results.

  The axis is bound, so ``fn`` may size per-replica buffers with
  ``lax.axis_size`` (e.g. ``compressed_pmean_init``). ``args`` are replicated.

  Returns:
    ``fn``'s pytree with a leading replica axis, sharded ``P(axis_name)``.
  """
  args = sh.replicated(args, mesh)
  f = jax.shard_map(lambda *a: sh.replica_view(fn(*a)), mesh=mesh,
                    in_specs=P(), out_specs=P(axis_name), check_vma=False)
  return jax.jit(f)(*args)


def mean_reducer() -> Reducer:
  """Exact mean: one f32 all-reduce (``psum / n``)."""

  def reduce(flat, state, axis_name):
    return lax.pmean(flat, axis_name), state

  return Reducer("mean", lambda flat, axis_name: (), reduce,
                 lambda d, n: ring_allreduce_bytes(4.0 * d, n))


def compressed_nbytes(compressor: Any, d: int, n: int,
                      schedule: str = "auto") -> float:
  """Per-device bytes of ``compressed_pmean`` on ``d`` values over ``n``.

  Ring model (ALGORITHMS.md §2.4) with payload sizes from
  ``compressor.payload_nbytes``: psum 2(n-1)/n·C(d); two-phase
  (n-1)·C(chunk) for the all_to_all plus as much for the all_gather;
  all_gather (n-1)·C(d).
  """
  if schedule == "auto":
    schedule = "psum" if compressor.linear else "two_phase"
  if n == 1:
    return 0.0
  if schedule == "psum":
    return ring_allreduce_bytes(compressor.payload_nbytes((d,)), n)
  if schedule == "all_gather":
    return (n - 1) * float(compressor.payload_nbytes((d,)))
  m = compressor.chunk_multiple
  c = -(-(-(-d // n)) // m) * m
  return 2.0 * (n - 1) * compressor.payload_nbytes((c,))


def compressed_reducer(compressor: Any, schedule: str = "auto",
                       **pmean_kwargs) -> Reducer:
  """Mean through ``gradax.distributed.compressed_pmean`` with ``compressor``.

  Args:
    compressor: a gradax compressor (``init``/``encode``/``decode``/
      ``payload_nbytes``/``linear``).
    schedule: ``compressed_pmean``'s schedule (``"auto"``: psum for linear
      compressors, two-phase otherwise).
    **pmean_kwargs: further keyword arguments of ``compressed_pmean``.

  Returns:
    A :class:`Reducer` whose state is the collective's per-replica state.
  """
  from gradax.distributed import collectives  # pylint: disable=g-import-not-at-top

  def init(flat, axis_name):
    return collectives.compressed_pmean_init(flat, compressor, axis_name,
                                             schedule)

  def reduce(flat, state, axis_name):
    return collectives.compressed_pmean(flat, compressor, axis_name, state,
                                        schedule, **pmean_kwargs)

  return Reducer(f"compressed_{compressor.name}", init, reduce,
                 lambda d, n: compressed_nbytes(compressor, d, n, schedule))


def robust_reducer(aggregator: Callable[[jax.Array], jax.Array]) -> Reducer:
  """A robust aggregate of all-gathered gradients (see ``robust.py``).

  Args:
    aggregator: maps the stacked ``(n, d)`` worker gradients to ``(d,)``.

  Returns:
    A :class:`Reducer`; its traffic is an all-gather of f32 gradients.
  """

  def reduce(flat, state, axis_name):
    stacked = lax.all_gather(flat, axis_name)
    return aggregator(stacked), state

  return Reducer(getattr(aggregator, "__name__", "robust"),
                 lambda flat, axis_name: (), reduce,
                 lambda d, n: (n - 1) * 4.0 * d)


def as_reducer(reducer: Any) -> Reducer | None:
  """Accepts a Reducer, ``"mean"``, ``None`` (optimizer communicates), a
  compressor (wrapped by :func:`compressed_reducer`) or an aggregator."""
  if reducer is None or isinstance(reducer, Reducer):
    return reducer
  if isinstance(reducer, str):
    if reducer == "mean":
      return mean_reducer()
    raise ValueError(
        f"reducer={reducer!r}; allowed: 'mean', None, a Reducer, a compressor "
        "or an aggregator callable.")
  if hasattr(reducer, "encode") and hasattr(reducer, "decode"):
    return compressed_reducer(reducer)
  if callable(reducer):
    return robust_reducer(reducer)
  raise ValueError(
      f"reducer={reducer!r}; allowed: 'mean', None, a Reducer, a compressor "
      "or an aggregator callable.")


def reduce_tree(reducer: Reducer, tree: Any, state: Any,
                axis_name: str) -> tuple[Any, Any]:
  """Reduces a pytree as one flat f32 vector (one collective, not one per leaf)."""
  flat, unravel = ravel_pytree(
      jax.tree.map(lambda x: x.astype(jnp.float32), tree))
  out, state = reducer.reduce(flat, state, axis_name)
  out = unravel(out)
  return jax.tree.map(lambda o, x: o.astype(x.dtype), out, tree), state


# --------------------------------------------------------------------------
# The data-parallel step.


class DataParallelState(NamedTuple):
  """State of :func:`data_parallel`.

  Attributes:
    params: parameters (replicated, or sharded under ZeRO-3).
    opt_state: optimizer state (replicated, sharded under ZeRO >= 1, or
      per-replica with a leading axis when the optimizer communicates).
    reducer_state: per-replica reducer state (leading replica axis).
    step: int32 step counter.
  """
  params: Any
  opt_state: Any
  reducer_state: Any
  step: jax.Array


def _slice_leaf(x, dim, n, axis_name):
  if dim is None:
    return x
  size = x.shape[dim] // n
  return lax.dynamic_slice_in_dim(x, lax.axis_index(axis_name) * size, size,
                                  dim)


def _gather_leaf(x, dim, axis_name):
  if dim is None:
    return x
  return lax.all_gather(x, axis_name, axis=dim, tiled=True)


def data_parallel(
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    reducer: Any = "mean",
    *,
    axis_name: str = "data",
    plan: sh.ShardingPlan | int = sh.ShardingPlan(),
    microbatches: int = 1,
    donate: bool = False,
) -> TrainAlgorithm:
  """Builds a jitted data-parallel train step.

  Each replica computes the gradient of ``loss_fn`` on its shard of the
  global batch (optionally as ``microbatches`` accumulated slices), the
  reducer combines the gradients over ``axis_name``, and ``optimizer`` updates
  the parameters. Under a ZeRO plan the optimizer update runs on each
  device's slice of the (sharded) state.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    optimizer: an optax ``GradientTransformation``. With ``reducer=None`` it
      must communicate itself over ``axis_name`` (built with
      ``axis_name=axis_name``); its state then has a leading replica axis.
    mesh: a mesh with axis ``axis_name`` (other axes replicate the work).
    reducer: ``"mean"`` (default), a :class:`Reducer`, a compressor, a robust
      aggregator (``(n, d) -> (d,)``), or ``None``.
    axis_name: the data axis.
    plan: a :class:`ShardingPlan` or a ZeRO stage 0-3.
    microbatches: micro-batches accumulated per replica per step.
    donate: donate the state buffers to the step.

  Returns:
    A :class:`TrainAlgorithm` named ``"data_parallel"``.

  Example:
    >>> mesh = make_mesh("data=8")
    >>> alg = data_parallel(loss, optax.adamw(1e-3), mesh, plan=1)
    >>> state = alg.init(params); state, m = alg.step(state, batch)
  """
  n = sh.axis_size(mesh, axis_name)
  red = as_reducer(reducer)
  microbatches = _check_microbatches(microbatches)
  if isinstance(plan, (int, np.integer)):
    plan = sh.zero_plan(int(plan))
  plan = sh.ShardingPlan(*plan).validate()
  if (plan.params == "sharded" or plan.grads == "sharded") and (
      plan.opt_state != "sharded"):
    raise ValueError(
        f"plan={tuple(plan)}: sharded params or grads need a sharded "
        "optimizer state (ZeRO stages nest: 1 = opt_state, 2 = + grads, "
        "3 = + params).")
  self_comm = red is None
  if self_comm and plan != sh.ShardingPlan():
    raise ValueError(
        f"reducer=None (the optimizer communicates) needs a replicated plan, "
        f"got plan={tuple(plan)}.")

  def dims(tree, rule):
    if rule == "replicated":
      return jax.tree.map(lambda _: None, tree)
    return jax.tree.map(lambda x: sh.shard_dim(np.shape(x), n), tree)


  def build(params):
    """Specs and the jitted step for params of this structure."""
    pspecs = sh.specs(params, mesh, plan.params, axis_name)
    if self_comm:
      ospecs = P(axis_name)  # prefix spec: every leaf is per replica
    else:
      ospecs = sh.specs(jax.eval_shape(optimizer.init, params), mesh,
                        plan.opt_state, axis_name)
    pdims = dims(params, "sharded")          # the ZeRO slicing dims
    rspecs = P(axis_name)  # prefix spec of the per-replica reducer state
    state_specs = DataParallelState(pspecs, ospecs, rspecs, P())

    def shard_step(state, batch):
      params_in = state.params
      # ZeRO-3: gather full parameters for the forward pass.
      if plan.params == "sharded":
        full = jax.tree.map(lambda x, d: _gather_leaf(x, d, axis_name),
                            params_in, pdims)
      else:
        full = params_in
      loss, grads = local_grad(loss_fn, full, batch, microbatches)
      rstate = sh.local_view(state.reducer_state)
      if self_comm:
        opt_state = sh.local_view(state.opt_state)
        updates, opt_state = optimizer.update(grads, opt_state, full)
        new_params = optax.apply_updates(full, updates)
        loss = lax.pmean(loss, axis_name)
        return DataParallelState(new_params, sh.replica_view(opt_state),
                                 state.reducer_state,
                                 state.step + 1), {"loss": loss}
      if plan.opt_state == "sharded" and red.name == "mean":
        # ZeRO: reduce-scatter each sharded leaf, all-reduce the rest.
        def rs(g, d):
          if d is None:
            return lax.pmean(g, axis_name)
          return lax.psum_scatter(g, axis_name, scatter_dimension=d,
                                  tiled=True) / n
        g_local = jax.tree.map(rs, grads, pdims)
        loss = lax.pmean(loss, axis_name)
      else:
        if red.name == "mean":
          # One all-reduce carries the gradients and the loss.
          (grads, loss), rstate = reduce_tree(red, (grads, loss), rstate,
                                              axis_name)
        else:
          grads, rstate = reduce_tree(red, grads, rstate, axis_name)
          loss = lax.pmean(loss, axis_name)
        if plan.opt_state == "sharded":
          g_local = jax.tree.map(lambda g, d: _slice_leaf(g, d, n, axis_name),
                                 grads, pdims)
        else:
          g_local = grads
      if plan.opt_state == "sharded":
        p_local = params_in if plan.params == "sharded" else jax.tree.map(
            lambda x, d: _slice_leaf(x, d, n, axis_name), params_in, pdims)
      else:
        p_local = params_in
      updates, opt_state = optimizer.update(g_local, state.opt_state, p_local)
      if plan.opt_state == "sharded" and plan.params != "sharded":
        updates = jax.tree.map(lambda u, d: _gather_leaf(u, d, axis_name),
                               updates, pdims)
      new_params = optax.apply_updates(params_in, updates)
      return DataParallelState(new_params, opt_state, sh.replica_view(rstate),
                               state.step + 1), {"loss": loss}

    def step(state, batch):
      bspecs = jax.tree.map(lambda _: P(axis_name), batch)
      f = jax.shard_map(shard_step, mesh=mesh,
                        in_specs=(state_specs, bspecs),
                        out_specs=(state_specs, {"loss": P()}),
                        check_vma=False)
      return f(state, batch)

    jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
    return state_specs, jitted

  get = cached_builder(build)

  def init(params):
    state_specs, _ = get(params)
    params = jax.tree.map(jnp.asarray, params)
    d = num_elements(params)
    rstate = () if red is None else init_per_replica(
        lambda: red.init(jnp.zeros((d,), jnp.float32), axis_name), mesh,
        axis_name)
    if self_comm:   # per-replica state, built where the axis is bound
      opt_state = init_per_replica(optimizer.init, mesh, axis_name, params)
      state = DataParallelState(params, (), (), jnp.zeros((), jnp.int32))
      state = sh.place(state, mesh, state_specs._replace(
          opt_state=(), reducer_state=()), axis_name)
      return state._replace(opt_state=opt_state, reducer_state=rstate)
    opt_state = optimizer.init(params)
    state = DataParallelState(params, opt_state, (), jnp.zeros((), jnp.int32))
    state = sh.place(state, mesh, state_specs._replace(reducer_state=()),
                     axis_name)
    return state._replace(reducer_state=rstate)

  on_cpu = mesh.devices.flat[0].platform == "cpu"

  def step(state, batch):
    _, jitted = get(state.params)
    out = jitted(state, place_batch(batch, mesh, axis_name))
    if on_cpu:
      # XLA:CPU runs each device's part of a program as soon as that device's
      # inputs are ready; with several collective programs in flight the
      # rendezvous threads can starve each other. One program at a time.
      jax.block_until_ready(out)
    return out

  def eval_params(state):
    return state.params

  def bytes_per_step(params):
    d = num_elements(params)
    if red is None:
      # The optimizer's own traffic; builders that know it replace this.
      return float("nan")
    if plan.opt_state == "sharded" and red.name == "mean":
      b = (n - 1) / n * 4.0 * d  # reduce-scatter
    else:
      b = red.nbytes(d, n)
    if plan.opt_state == "sharded":
      b += (n - 1) / n * 4.0 * d  # all-gather of the params or the updates
    return float(b)

  # Introspection (HLO tests, byte counters): the jitted program taking an
  # already-placed batch.
  step.jitted = lambda state: get(state.params)[1]
  return TrainAlgorithm("data_parallel", init, step, eval_params,
                        bytes_per_step, mesh, axis_name)
