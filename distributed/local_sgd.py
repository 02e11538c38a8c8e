"""Local SGD and the local-update template shared by the DiLoCo family.

Template (ALGORITHMS.md §3.1): n replicas each run inner optimizer steps on
their own shard of every global batch; every H steps a *sync* combines the
replicas. Local SGD's sync averages the parameters,

    θ ← (1/n) Σ_m θ_m ,   then every θ_m ← θ ,

(Stich, "Local SGD Converges Fast and Communicates Little", 2018,
arXiv 1805.09767; Lin et al., "Don't Use Large Mini-Batches, Use Local SGD",
2018, arXiv 1808.07217). DiLoCo, Streaming DiLoCo, eager updates and CO2 are
other syncs on the same template.

Per-replica values (local params, inner optimizer state, per-replica sync
state) carry a leading replica axis sharded over the data axis; the step is
one ``shard_map`` program in which inner steps communicate nothing and the
sync runs under ``lax.cond`` (replicated predicate). ``round`` runs one
compiled sync period: a ``lax.scan`` over H inner steps plus one sync, so its
HLO holds exactly the sync's collectives.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gradax.distributed.data_parallel import (
    TrainAlgorithm, _check_microbatches, as_reducer, cached_builder,
    init_per_replica, one_replica as _one_replica,
    local_grad, num_elements, place_batch, reduce_tree)
from gradax.distributed import sharding as sh


class LocalUpdateState(NamedTuple):
  """State of a local-update algorithm.

  Attributes:
    params: per-replica parameters, leading replica axis.
    inner_state: per-replica inner optimizer state, leading replica axis.
    sync_state: replicated state of the sync (e.g. global params, outer
      optimizer state).
    replica_sync_state: per-replica state of the sync (e.g. compressor error
      feedback, previous local pseudo-gradient), leading replica axis.
    step: int32 count of inner steps taken.
  """
  params: Any
  inner_state: Any
  sync_state: Any
  replica_sync_state: Any
  step: jax.Array


class Sync(NamedTuple):
  """What an algorithm plugs into :func:`local_update`.

  Attributes:
    init: ``init(params) -> sync_state`` (replicated).
    init_replica: ``init_replica(params) -> replica_sync_state`` for one
      replica, called inside ``shard_map`` over the replica axis (the
      template stacks the results).
    sync: inside ``shard_map``, one replica's view:
      ``sync(params, inner_state, sync_state, replica_sync_state, step) ->
      (params, inner_state, sync_state, replica_sync_state)``, where ``step``
      counts inner steps done (including the one just taken).
    eval_params: ``eval_params(sync_state, replica_sync_state) -> params``
      (at the jit level; per-replica state keeps its leading axis).
    nbytes: ``nbytes(d, n) -> float`` per-device bytes of one sync period.
    every_step: call ``sync`` after every inner step (it schedules itself)
      instead of once every ``period`` steps.
  """
  init: Callable
  init_replica: Callable
  sync: Callable
  eval_params: Callable
  nbytes: Callable[[int, int], float]
  every_step: bool = False


def check_period(sync_every: Any, name: str = "sync_every") -> int:
  """Validates a sync period H >= 1."""
  if (isinstance(sync_every, bool) or
      not isinstance(sync_every, (int, np.integer)) or sync_every < 1):
    raise ValueError(
        f"{name}={sync_every!r}; the sync period must be an integer >= 1.")
  return int(sync_every)


def _host_mean(losses: jax.Array) -> np.ndarray:
  # Mean of the per-replica losses on the host: launching a separate
  # collective program for a metric can interleave with the next step's
  # collectives on XLA:CPU and deadlock its rendezvous.
  return np.float32(np.mean(sh.to_host(losses)))


def tree_sub(a, b):
  return jax.tree.map(lambda x, y: x - y, a, b)


def local_update(
    name: str,
    loss_fn: Callable[[Any, Any], jax.Array],
    inner: optax.GradientTransformation,
    mesh: Mesh,
    sync: Sync,
    sync_every: int,
    *,
    axis_name: str = "data",
    microbatches: int = 1,
) -> TrainAlgorithm:
  """Builds a local-update algorithm from an inner optimizer and a sync.

  Args:
    name: registry name.
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    inner: the inner optax optimizer (any; its state stays per replica).
    mesh: mesh with the replica axis ``axis_name``.
    sync: the :class:`Sync`.
    sync_every: H, inner steps per sync (>= 1).
    axis_name: the replica axis.
    microbatches: micro-batches per inner step.

  Returns:
    A :class:`~gradax.distributed.data_parallel.TrainAlgorithm` whose
    ``round(state, batches)`` takes H stacked global batches (leading axis H)
    and runs one whole sync period as one compiled program.
  """
  H = check_period(sync_every)
  n = sh.axis_size(mesh, axis_name)
  microbatches = _check_microbatches(microbatches)  # pylint: disable=protected-access

  def inner_step(params, inner_state, batch):
    loss, g = local_grad(loss_fn, params, batch, microbatches)
    upd, inner_state = inner.update(g, inner_state, params)
    return optax.apply_updates(params, upd), inner_state, loss

  def do_sync(params, inner_state, s, r, step):
    return sync.sync(params, inner_state, s, r, step)

  def one_step(carry, batch):
    params, inner_state, s, r, step = carry
    params, inner_state, loss = inner_step(params, inner_state, batch)
    step = step + 1
    if sync.every_step:
      params, inner_state, s, r = do_sync(params, inner_state, s, r, step)
    else:
      params, inner_state, s, r = lax.cond(
          step % H == 0, do_sync, lambda *a: a[:4], params, inner_state, s, r,
          step)
    return (params, inner_state, s, r, step), loss

  def build(params):
    s_abs = jax.eval_shape(sync.init, params)
    state_specs = LocalUpdateState(
        sh.replica_specs(params, axis_name),
        sh.replica_specs(jax.eval_shape(inner.init, params), axis_name),
        jax.tree.map(lambda _: P(), s_abs), P(axis_name), P())

    def unpack(state):
      return (sh.local_view(state.params), sh.local_view(state.inner_state),
              state.sync_state, sh.local_view(state.replica_sync_state),
              state.step)

    def pack(carry):
      params, inner_state, s, r, step = carry
      return LocalUpdateState(sh.replica_view(params),
                              sh.replica_view(inner_state), s,
                              sh.replica_view(r), step)

    def shard_step(state, batch):
      carry, loss = one_step(unpack(state), batch)
      return pack(carry), loss[None]

    def shard_round(state, batches):
      carry = unpack(state)
      if sync.every_step:
        carry, losses = lax.scan(one_step, carry, batches)
      else:
        params, inner_state, s, r, step = carry

        def body(c, b):
          p, i, t = c
          p, i, loss = inner_step(p, i, b)
          return (p, i, t + 1), loss

        (params, inner_state, step), losses = lax.scan(
            body, (params, inner_state, step), batches)
        params, inner_state, s, r = do_sync(params, inner_state, s, r, step)
        carry = (params, inner_state, s, r, step)
      return pack(carry), jnp.mean(losses)[None]

    def step(state, batch):
      f = jax.shard_map(
          shard_step, mesh=mesh,
          in_specs=(state_specs, jax.tree.map(lambda _: P(axis_name), batch)),
          out_specs=(state_specs, P(axis_name)), check_vma=False)
      return f(state, batch)

    def round_(state, batches):
      f = jax.shard_map(
          shard_round, mesh=mesh,
          in_specs=(state_specs,
                    jax.tree.map(lambda _: P(None, axis_name), batches)),
          out_specs=(state_specs, P(axis_name)), check_vma=False)
      return f(state, batches)

    return state_specs, jax.jit(step), jax.jit(round_)

  get = cached_builder(build)

  def one_replica(state):
    return _one_replica(state.params)

  def init(params):
    params = jax.tree.map(jnp.asarray, params)
    state_specs, _, _ = get(params)
    state = LocalUpdateState(
        sh.stack_replicas(params, n), sh.stack_replicas(inner.init(params), n),
        sync.init(params), (), jnp.zeros((), jnp.int32))
    state = sh.place(state, mesh,
                     state_specs._replace(replica_sync_state=()), axis_name)
    r = init_per_replica(sync.init_replica, mesh, axis_name, params)
    return state._replace(replica_sync_state=r)

  def step(state, batch):
    _, jitted, _ = get(one_replica(state))
    state, losses = jitted(state, place_batch(batch, mesh, axis_name))
    return state, {"loss": _host_mean(losses)}

  def round_(state, batches):
    """Runs H inner steps and one sync; ``batches`` has a leading axis H."""
    _, _, jitted = get(one_replica(state))
    for x in jax.tree.leaves(batches):
      if np.shape(x)[0] != H:
        raise ValueError(
            f"round: batches have leading axis {np.shape(x)[0]}; expected the "
            f"sync period H={H}.")
    batches = sh.place(batches, mesh,
                       jax.tree.map(lambda _: P(None, axis_name), batches),
                       axis_name)
    state, losses = jitted(state, batches)
    return state, {"loss": _host_mean(losses)}

  def eval_params(state):
    return sync.eval_params(state.sync_state, state.replica_sync_state)

  def bytes_per_step(params):
    return float(sync.nbytes(num_elements(params), n)) / H

  # Introspection (HLO tests, byte counters): the jitted programs taking
  # already-placed inputs.
  step.jitted = lambda state: get(one_replica(state))[1]
  round_.jitted = lambda state: get(one_replica(state))[2]
  round_.place = lambda batches: sh.place(
      batches, mesh, jax.tree.map(lambda _: P(None, axis_name), batches),
      axis_name)
  alg = TrainAlgorithm(name, init, step, eval_params, bytes_per_step, mesh,
                          axis_name, round_, H)
  return alg


def averaging_sync(reducer: Any = "mean", axis_name: str = "data") -> Sync:
  """Local SGD's sync: every replica takes the (reduced) mean of the params."""
  red = as_reducer(reducer)
  if red is None:
    raise ValueError("reducer=None is not allowed for parameter averaging.")

  def init_replica(params):
    return red.init(jnp.zeros((num_elements(params),), jnp.float32),
                    axis_name)

  def sync(params, inner_state, s, r, step):
    del s, step
    params, r = reduce_tree(red, params, r, axis_name)
    return params, inner_state, params, r

  return Sync(lambda params: params, init_replica, sync, lambda s, r: s,
              red.nbytes)


def local_sgd(
    loss_fn: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    sync_every: int = 8,
    *,
    reducer: Any = "mean",
    axis_name: str = "data",
    microbatches: int = 1,
) -> TrainAlgorithm:
  """Local SGD: H local steps per replica, then parameter averaging.

  Update: each replica m runs θ_m ← θ_m + U(∇L_m(θ_m)) for H steps, then
  θ_m ← (1/n) Σ_k θ_k. The local optimizer state is never averaged.

  Paper: Stich, "Local SGD Converges Fast and Communicates Little", 2018,
  arXiv 1805.09767.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    optimizer: the local optax optimizer.
    mesh: mesh with axis ``axis_name``.
    sync_every: H >= 1.
    reducer: how parameters are averaged (``"mean"`` or a compressor /
      :class:`~gradax.distributed.data_parallel.Reducer`).
    axis_name: the replica axis.
    microbatches: micro-batches per local step.

  Returns:
    A ``TrainAlgorithm`` named ``"local_sgd"`` (with ``round``).

  Example:
    >>> alg = local_sgd(loss, optax.sgd(0.1), make_mesh("data=8"), 16)
    >>> state = alg.init(params)
    >>> state, metrics = alg.step(state, batch)
  """
  return local_update("local_sgd", loss_fn, optimizer, mesh,
                      averaging_sync(reducer, axis_name), sync_every,
                      axis_name=axis_name, microbatches=microbatches)
