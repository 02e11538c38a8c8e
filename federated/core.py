"""Federated core: client data, local training, client mapping and the round.

A federated algorithm is ``FederatedAlgorithm(init, round)``:

* ``init(params) -> ServerState``;
* ``round(state, data, inputs) -> (state, diagnostics)`` is ONE pure, jittable
  function of the server state, the clients' data (``ClientData``) and the
  round's inputs (``RoundInput``: who participates, a PRNG key, how much local
  work each client does), so ``lax.scan`` can run many rounds in one program.

Client work is written for one client (``local_train``: a local optax
optimizer over local minibatches, with a gradient hook for proximal terms and
control variates) and mapped over a client axis with ``map_clients``: ``vmap``
on one device, ``shard_map`` over a ``clients`` mesh axis across devices.

Heterogeneity is static-shape: every client's examples are padded to the same
length ``M`` with ``num_examples`` giving the real count, and every client runs
the same number of scan steps, with steps past its own budget masked out
(stragglers do less work; clients with fewer examples take fewer epoch steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gradax.federated import aggregators as aggs

PyTree = Any
LossFn = Callable[[PyTree, dict], jax.Array]
# grad_hook(grads, params, ctx) -> grads; ctx always holds "anchor" (the
# global model at the start of the round) plus algorithm-specific entries.
GradHook = Callable[[PyTree, PyTree, dict], PyTree]


class ClientData(NamedTuple):
  """All clients' examples, padded to a common length.

  Attributes:
    examples: dict of arrays with leading axes ``[N, M, ...]`` (``N`` clients,
      ``M`` example slots; slots ``>= num_examples[n]`` are padding).
    num_examples: ``[N]`` int32, real example count of each client.
  """
  examples: dict
  num_examples: jax.Array

  @property
  def num_clients(self) -> int:
    return int(self.num_examples.shape[0])


class RoundInput(NamedTuple):
  """What one round needs besides the server state and the data.

  Attributes:
    participating: ``[N]`` bool, the clients that take part this round.
    key: PRNG key of the round; client ``n`` uses ``fold_in(key, n)``, so its
      randomness does not depend on which other clients take part.
    work: ``[N]`` int32 local work per client, in the unit of the algorithm's
      ``LocalConfig`` (steps or epochs). ``0`` means "no local work".
  """
  participating: jax.Array
  key: jax.Array
  work: jax.Array


class ServerState(NamedTuple):
  """Generic server state (algorithms may add fields in ``extra``)."""
  params: PyTree
  opt_state: PyTree
  agg_state: PyTree
  round: jax.Array
  extra: PyTree = ()


class ClientOutput(NamedTuple):
  """One client's result of ``local_train``."""
  params: PyTree          # y: the locally trained model
  num_steps: jax.Array    # int32 local steps actually taken
  mean_loss: jax.Array    # mean minibatch loss over the steps taken


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """How a client turns its examples into local steps.

  Attributes:
    batch_size: minibatch size B.
    unit: ``"steps"`` (``work`` counts minibatch steps, examples drawn uniformly
      with replacement from the client's own examples) or ``"epochs"``
      (``work`` counts passes over a fresh shuffle; ``ceil(n_k / B)`` steps per
      epoch, the last minibatch partial and masked).
    max_work: static upper bound of ``work`` (sets the scan length).
  """
  batch_size: int
  unit: str = "steps"
  max_work: int = 1

  def __post_init__(self):
    if int(self.batch_size) < 1:
      raise ValueError(
          f"batch_size must be a positive integer, got {self.batch_size}.")
    if self.unit not in ("steps", "epochs"):
      raise ValueError(
          f"unit must be 'steps' or 'epochs', got {self.unit!r}.")
    if int(self.max_work) < 1:
      raise ValueError(
          f"max_work must be a positive integer, got {self.max_work}.")

  def max_steps(self, max_examples: int) -> int:
    if self.unit == "steps":
      return int(self.max_work)
    return int(self.max_work) * max(1, -(-int(max_examples) // self.batch_size))


class FederatedAlgorithm(NamedTuple):
  """An algorithm as two pure functions (FedJAX style), plus its parts.

  Attributes:
    init: ``init(params) -> state``.
    round: ``round(state, data, inputs) -> (state, diagnostics)``.
    client_update: optional ``client_update(state, examples_k, n_k, work_k,
      key_k, client_id) -> (payload, num_examples)`` for one client, used by
      deployments (Flower) that run clients in other processes.
    server_update: optional ``server_update(state, payloads, client_ids,
      valid, num_examples, participating) -> (state, diagnostics)``.
  """
  init: Callable
  round: Callable
  client_update: Callable | None = None
  server_update: Callable | None = None


def tree_where(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def tree_sub(a, b):
  return jax.tree.map(jnp.subtract, a, b)


def tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def tree_scale(a, s):
  return jax.tree.map(lambda x: (x * s).astype(x.dtype), a)


def _steps_for(cfg: LocalConfig, n_k, work_k):
  work_k = jnp.asarray(work_k, jnp.int32)
  if cfg.unit == "steps":
    steps = work_k
  else:
    per_epoch = jnp.maximum(1, (n_k + cfg.batch_size - 1) // cfg.batch_size)
    steps = work_k * per_epoch
  return jnp.where(n_k > 0, steps, 0).astype(jnp.int32)


def local_train(loss_fn: LossFn, tx: optax.GradientTransformation,
                params: PyTree, examples_k: dict, n_k, work_k, key,
                cfg: LocalConfig, grad_hook: GradHook | None = None,
                ctx: dict | None = None, max_steps: int | None = None,
                grad_fn: Callable | None = None,
                tx_init: Callable | None = None) -> ClientOutput:
  """Runs one client's local optimizer from ``params`` (the global model).

  At step s (active while s < budget), with minibatch ξ_s from the client's
  own examples: g = ∇ℓ(y; ξ_s), g ← hook(g, y, ctx), (u, opt) = tx(g, opt, y),
  y ← y + u. Steps past the budget leave y and the optimizer state untouched.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``; ``batch`` holds the example
      fields plus ``"mask"`` (float ``[B]`` per-example weights; padding is 0),
      which the loss must use as a weighted mean.
    tx: the local optax optimizer (re-initialised every round).
    params: the global model x_t.
    examples_k: dict of arrays ``[M, ...]``, this client's padded examples.
    n_k: int32 scalar, real number of examples (0: the client does nothing).
    work_k: int32 local work in ``cfg.unit``.
    key: this client's PRNG key for the round.
    cfg: ``LocalConfig``.
    grad_hook: optional ``hook(grads, y, ctx) -> grads``.
    ctx: extra hook context; ``ctx["anchor"]`` is set to ``params``.
    max_steps: static scan length (default ``cfg.max_steps(M)``).
    grad_fn: optional ``grad_fn(params, batch, ctx) -> (loss, grads)``
      replacing ``value_and_grad(loss_fn)`` (e.g. SAM, masked sub-models).
    tx_init: optional ``tx_init(params, ctx) -> opt_state`` replacing
      ``tx.init(params)``, for local optimizers whose state starts from
      server information (e.g. FedHyper-CL's last global update).

  Returns:
    ``ClientOutput(params=y, num_steps, mean_loss)``.
  """
  examples_k = jax.tree.map(jnp.asarray, examples_k)
  m = jax.tree.leaves(examples_k)[0].shape[0]
  if max_steps is None:
    max_steps = cfg.max_steps(m)
  n_k = jnp.asarray(n_k, jnp.int32)
  budget = _steps_for(cfg, n_k, work_k)
  ctx = dict(ctx or {})
  ctx["anchor"] = params
  batch_at = make_batcher(cfg, examples_k, n_k, key, num_steps=max_steps)

  opt_state = tx.init(params) if tx_init is None else tx_init(params, ctx)
  if grad_fn is None:
    vg = jax.value_and_grad(loss_fn)
    grad_fn = lambda p, b, c: vg(p, b)  # noqa: E731

  def step(carry, s):
    y, opt, loss_sum = carry
    batch = batch_at(s)
    loss, g = grad_fn(y, batch, ctx)
    if grad_hook is not None:
      g = grad_hook(g, y, ctx)
    upd, new_opt = tx.update(g, opt, y)
    new_y = optax.apply_updates(y, upd)
    active = s < budget
    y = tree_where(active, new_y, y)
    opt = tree_where(active, new_opt, opt)
    loss_sum = loss_sum + jnp.where(active, loss, 0.0)
    return (y, opt, loss_sum), None

  (y, _, loss_sum), _ = jax.lax.scan(
      step, (params, opt_state, jnp.zeros((), jnp.float32)),
      jnp.arange(max_steps, dtype=jnp.int32))
  mean_loss = loss_sum / jnp.maximum(budget, 1).astype(jnp.float32)
  return ClientOutput(y, budget, mean_loss)


def map_clients(fn: Callable, in_axes, mesh=None,
                axis_name: str = "clients") -> Callable:
  """Maps a one-client function over a leading client axis.

  Without a mesh this is ``jax.vmap(fn, in_axes)``. With a mesh that has a
  ``clients`` axis, the client axis is split over it with ``jax.shard_map``
  (each device vmaps over its own block of clients; broadcast arguments are
  replicated); the number of mapped clients must divide evenly.

  Args:
    fn: function of one client.
    in_axes: per positional argument, 0 (mapped over clients) or None.
    mesh: optional ``jax.sharding.Mesh`` with axis ``axis_name``.
    axis_name: the mesh axis holding clients.

  Returns:
    The mapped function; its outputs have a leading client axis.
  """
  vf = jax.vmap(fn, in_axes=in_axes)
  if mesh is None:
    return vf
  if axis_name not in mesh.axis_names:
    raise ValueError(
        f"mesh has axes {mesh.axis_names}; map_clients needs an axis named "
        f"{axis_name!r}.")
  specs = tuple(P(axis_name) if a == 0 else P() for a in in_axes)

  def mapped(*args):
    size = mesh.shape[axis_name]
    for a, x in zip(in_axes, args):
      leaves = jax.tree.leaves(x)
      if a == 0 and leaves:
        c = leaves[0].shape[0]
        if c % size:
          raise ValueError(
              f"{c} mapped clients do not split over the {size} devices of "
              f"mesh axis {axis_name!r}; use a capacity that is a multiple "
              f"of {size}.")
    placed = tuple(
        jax.tree.map(lambda l, s=s: jax.sharding.reshard(
            l, NamedSharding(mesh, P(*s, *([None] * (l.ndim - len(s)))))), x)
        for x, s in zip(args, specs))
    # check_vma off: replicated params become per-client carries in scan
    return jax.shard_map(vf, mesh=mesh, in_specs=specs,
                         out_specs=P(axis_name), check_vma=False)(*placed)

  return mapped


def select_clients(participating: jax.Array, capacity: int):
  """Static-size list of participating client ids.

  Returns ``(ids [capacity] int32, valid [capacity] bool, overflow int32)``;
  participants beyond ``capacity`` are left out (``overflow`` counts them).
  """
  participating = participating.astype(bool)
  (ids,) = jnp.nonzero(participating, size=capacity, fill_value=0)
  count = jnp.sum(participating.astype(jnp.int32))
  valid = jnp.arange(capacity) < count
  return ids.astype(jnp.int32), valid, jnp.maximum(count - capacity, 0)


def client_slots(participating: jax.Array, capacity: int, per_client,
                 in_place: bool = True):
  """The round's client slots and the per-client arrays gathered into them.

  With ``capacity < N`` (or ``in_place=False``) the participants are
  compacted into ``capacity`` slots (``select_clients``) and every leaf of
  ``per_client`` (leading axis ``[N]``) is gathered to ``[capacity]``. With
  ``capacity == N`` and ``in_place`` slot n holds client n (``valid`` = who
  participates): the same clients do the same work with the same keys, and
  the data is used in place instead of copied by a gather each round.
  (Sharded rounds compact: fed in place, the per-client server state would
  come back sharded like the client work.)

  Returns:
    ``(ids, valid, overflow, participating, per_client_in_slots)``, where
    ``participating`` keeps only the clients that got a slot.
  """
  participating = participating.astype(bool)
  n = participating.shape[0]
  if in_place and capacity == n:
    return (jnp.arange(n, dtype=jnp.int32), participating,
            jnp.zeros((), jnp.int32), participating, per_client)
  ids, valid, overflow = select_clients(participating, capacity)
  participating = jnp.zeros_like(participating).at[ids].max(valid)
  return (ids, valid, overflow, participating,
          jax.tree.map(lambda a: a[ids], per_client))


def client_keys(key, ids):
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def check_round_input(data: ClientData, inputs: RoundInput):
  """Static shape checks of a round's inputs against the data."""
  n = data.num_examples.shape[0]
  if inputs.participating.shape != (n,):
    raise ValueError(
        f"participating has shape {inputs.participating.shape} but the data "
        f"holds {n} clients; the participation model and the data must have "
        "the same number of clients.")
  if inputs.work.shape != (n,):
    raise ValueError(
        f"work has shape {inputs.work.shape} but the data holds {n} clients; "
        "give one work value per client.")


def make_round_input(participating, key, work) -> RoundInput:
  """Builds a ``RoundInput``, broadcasting a scalar ``work`` to every client."""
  participating = jnp.asarray(participating, bool)
  work = jnp.broadcast_to(jnp.asarray(work, jnp.int32), participating.shape)
  return RoundInput(participating, key, work)


def run_rounds(alg: FederatedAlgorithm, state, data: ClientData,
               participation, keys, work):
  """Runs ``T`` rounds in one ``lax.scan``.

  Args:
    alg: the algorithm.
    state: its server state.
    data: ``ClientData``.
    participation: ``[T, N]`` bool.
    keys: ``[T]`` PRNG keys (or one key, split into T).
    work: ``[T, N]`` or ``[N]`` or scalar int local work.

  Returns:
    ``(state, diagnostics stacked over rounds)``.
  """
  participation = jnp.asarray(participation, bool)
  t, n = participation.shape
  if n != data.num_examples.shape[0]:
    raise ValueError(
        f"participation covers {n} clients but the data holds "
        f"{data.num_examples.shape[0]}; they must match.")
  keys = jnp.asarray(keys)
  typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
  if keys.ndim == (0 if typed else 1):
    keys = jax.random.split(keys, t)
  work = jnp.broadcast_to(jnp.asarray(work, jnp.int32), (t, n))

  def body(s, xs):
    p, k, w = xs
    return alg.round(s, data, RoundInput(p, k, w))

  return jax.lax.scan(body, state, (participation, keys, work))


def as_client_data(examples: dict, num_examples) -> ClientData:
  """Wraps padded arrays as ``ClientData`` (checks the client counts agree)."""
  examples = {k: jnp.asarray(v) for k, v in examples.items()}
  num_examples = jnp.asarray(num_examples, jnp.int32)
  n = num_examples.shape[0]
  for k, v in examples.items():
    if v.shape[0] != n:
      raise ValueError(
          f"examples[{k!r}] has {v.shape[0]} clients but num_examples has {n};"
          " every field needs a leading client axis of the same size.")
  return ClientData(examples, num_examples)


def local_update_algorithm(loss_fn: LossFn,
                           client_tx: optax.GradientTransformation,
                           local: LocalConfig, *, num_clients: int,
                           aggregator, server_tx: optax.GradientTransformation,
                           grad_hook: GradHook | None = None,
                           ctx_fn: Callable | None = None,
                           client_ctx_fn: Callable | None = None,
                           grad_fn: Callable | None = None,
                           client_tx_init: Callable | None = None,
                           capacity: int | None = None, mesh=None,
                           axis_name: str = "clients") -> FederatedAlgorithm:
  """The FedAvg family: local optimizer on clients, aggregator + server optax.

  Round t: for n ∈ S_t (participants with at least one example),
  y_n = local_train(x_t) and Δ_n = y_n − x_t; a = aggregator(Δ, metadata);
  x_{t+1} = x_t + server_tx(−a). With ``sgd(1)`` and ``example_weighted_mean``
  this is FedAvg (McMahan et al. 2017, arXiv 1602.05629).

  Args:
    loss_fn: ``loss_fn(params, batch)`` honouring ``batch["mask"]``.
    client_tx: local optax optimizer.
    local: ``LocalConfig``.
    num_clients: N, the total number of clients.
    aggregator: an ``Aggregator``.
    server_tx: optax optimizer applied to the pseudo-gradient −a.
    grad_hook: optional local gradient hook (e.g. the proximal term).
    ctx_fn: optional ``ctx_fn(state) -> dict`` of extra hook context shared by
      all clients.
    client_ctx_fn: optional ``client_ctx_fn(state, ids) -> dict`` of
      per-client context (leading axis over the client slots ``ids``).
    grad_fn: optional ``grad_fn(params, batch, ctx) -> (loss, grads)``.
    client_tx_init: optional ``init(params, ctx) -> opt_state`` of the local
      optimizer (see ``local_train``'s ``tx_init``).
    capacity: static number of client slots per round (default N). Rounds
      with more participants drop the surplus (counted in ``overflow``).
    mesh: optional mesh with a ``clients`` axis to shard the client work.
    axis_name: the mesh axis name.

  Returns:
    ``FederatedAlgorithm`` with ``client_update`` and ``server_update`` set.
  """
  if int(num_clients) < 1:
    raise ValueError(
        f"num_clients must be a positive integer, got {num_clients}.")
  num_clients = int(num_clients)
  cap = num_clients if capacity is None else int(capacity)
  if not 1 <= cap <= num_clients:
    raise ValueError(
        f"capacity must lie in [1, num_clients={num_clients}], got {capacity}.")

  def init(params):
    return ServerState(params, server_tx.init(params),
                       aggregator.init(params, num_clients),
                       jnp.zeros((), jnp.int32))

  def one_client(params, examples_k, n_k, work_k, key_k, ctx, cctx):
    ctx = dict(ctx, **cctx)
    out = local_train(loss_fn, client_tx, params, examples_k, n_k, work_k,
                      key_k, local, grad_hook, ctx, grad_fn=grad_fn,
                      tx_init=client_tx_init)
    return tree_sub(out.params, params), out.num_steps, out.mean_loss

  def client_update(state, examples_k, n_k, work_k, key_k, client_id=0):
    ctx = ctx_fn(state) if ctx_fn else {}
    cctx = {}
    if client_ctx_fn:
      ids = jnp.asarray(client_id, jnp.int32)[None]
      cctx = jax.tree.map(lambda a: a[0], client_ctx_fn(state, ids))
    delta, _, _ = one_client(state.params, examples_k, n_k, work_k, key_k, ctx,
                             cctx)
    return delta, jnp.asarray(n_k, jnp.int32)

  def server_update(state, deltas, ids, valid, n_ex, participating):
    deltas = tree_where_clients(valid, deltas)
    agg, agg_state = aggregator.apply(
        aggs.AggregatorInput(deltas, ids, valid, n_ex, participating),
        state.agg_state)
    pg = jax.tree.map(jnp.negative, agg)
    upd, opt_state = server_tx.update(pg, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    return state._replace(params=params, opt_state=opt_state,
                          agg_state=agg_state, round=state.round + 1)

  def round_fn(state, data: ClientData, inputs: RoundInput):
    check_round_input(data, inputs)
    if data.num_examples.shape[0] != num_clients:
      raise ValueError(
          f"the data holds {data.num_examples.shape[0]} clients but the "
          f"algorithm was built for num_clients={num_clients}.")
    part = inputs.participating.astype(bool) & (data.num_examples > 0)
    ids, valid, overflow, part, (ex, n_ex, work) = client_slots(
        part, cap, (data.examples, data.num_examples, inputs.work),
        in_place=mesh is None)
    keys = client_keys(inputs.key, ids)
    ctx = ctx_fn(state) if ctx_fn else {}
    cctx = client_ctx_fn(state, ids) if client_ctx_fn else {}
    mapped = map_clients(one_client, (None, 0, 0, 0, 0, None, 0), mesh,
                         axis_name)
    deltas, steps, losses = mapped(state.params, ex, n_ex, work, keys, ctx,
                                   cctx)
    new_state = server_update(state, deltas, ids, valid, n_ex, part)
    vf = valid.astype(jnp.float32)
    diag = {
        "num_participants": jnp.sum(valid.astype(jnp.int32)),
        "client_loss": jnp.sum(losses * vf) / jnp.maximum(jnp.sum(vf), 1.0),
        "client_steps": jnp.sum(jnp.where(valid, steps, 0)),
        "overflow": overflow,
    }
    return new_state, diag

  return FederatedAlgorithm(init, round_fn, client_update, server_update)


def tree_where_clients(valid, tree):
  """Zeroes the entries of invalid client slots (leading axis)."""
  def f(u):
    v = valid.reshape(valid.shape + (1,) * (u.ndim - 1))
    return jnp.where(v, u, jnp.zeros_like(u))
  return jax.tree.map(f, tree)


def sam_grad_fn(loss_fn: LossFn, rho: float) -> Callable:
  """SAM gradient ∇ℓ(w + ρ·g/‖g‖) with g = ∇ℓ(w) (Foret et al., 2010.01412).

  Returns ``grad_fn(params, batch, ctx) -> (loss at w, SAM gradient)``.
  """
  if not float(rho) >= 0:
    raise ValueError(f"rho must be >= 0, got {rho}.")
  vg = jax.value_and_grad(loss_fn)

  def grad_fn(params, batch, ctx):
    del ctx
    loss, g = vg(params, batch)
    norm = optax.tree.norm(g)
    e = jax.tree.map(lambda x: rho * x / jnp.maximum(norm, 1e-12), g)
    _, g2 = vg(tree_add(params, e), batch)
    return loss, g2
  return grad_fn


def make_batcher(cfg: LocalConfig, examples_k: dict, n_k, key,
                 num_steps: int | None = None) -> Callable:
  """``batch_at(s) -> batch``: the s-th local minibatch of one client.

  ``"steps"``: B indices uniform with replacement over the n_k real examples,
  drawn with ``fold_in(key, s)``. ``"epochs"``: epoch e uses a fresh shuffle
  (key ``split(key, max_work)[e]``), ``ceil(n_k/B)`` minibatches per epoch,
  the last one partial (its padding has ``mask`` 0).

  ``num_steps`` (static, optional): the caller only asks for
  ``0 <= s < num_steps``. With ``"steps"`` the indices of all those steps are
  then drawn up front in one batched draw (the same numbers as drawing them
  step by step), which keeps the PRNG's small per-step loops out of the
  caller's scan (on CPU they cost about as much as a small model's step).
  """
  examples_k = jax.tree.map(jnp.asarray, examples_k)
  m = jax.tree.leaves(examples_k)[0].shape[0]
  n_k = jnp.asarray(n_k, jnp.int32)
  bsz = cfg.batch_size
  safe_n = jnp.maximum(n_k, 1)
  if cfg.unit == "epochs":
    per_epoch = jnp.maximum(1, (n_k + bsz - 1) // bsz)
    epoch_keys = jax.random.split(key, cfg.max_work)
    ranks = jnp.arange(m)

    def perm(k):
      # valid slots first, in random order
      u = jax.random.uniform(k, (m,))
      return jnp.argsort(jnp.where(ranks < n_k, u, 2.0))

    perms = jax.vmap(perm)(epoch_keys)   # [E, M]

    def batch_at(s):
      e = jnp.minimum(s // per_epoch, cfg.max_work - 1)
      j = s % per_epoch
      pos = j * bsz + jnp.arange(bsz)
      idx = perms[e, jnp.minimum(pos, m - 1)]
      mask = (pos < n_k).astype(jnp.float32)
      return idx, mask
  else:
    def draw(s):
      return jax.random.randint(jax.random.fold_in(key, s), (bsz,), 0, safe_n)

    if num_steps is None:
      def batch_at(s):
        return draw(s), jnp.ones((bsz,), jnp.float32)
    else:
      table = jax.vmap(draw)(jnp.arange(num_steps, dtype=jnp.int32))

      def batch_at(s):
        return table[s], jnp.ones((bsz,), jnp.float32)

  def batch_at_full(s):
    idx, mask = batch_at(s)
    batch = jax.tree.map(lambda a: a[idx], examples_k)
    batch["mask"] = mask
    return batch

  return batch_at_full
