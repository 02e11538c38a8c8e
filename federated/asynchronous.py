"""Buffered asynchronous FL (FedBuff; FedAsync as buffer size 1) on a
simulated clock.

C clients train concurrently. A client dispatched at model version v_d
downloads x, trains (its local update Δ is computed at dispatch, since it
depends only on the model it downloaded) and reports after a random duration
drawn from its speed model. Events are processed in order of finishing time:
the server adds s(τ)·Δ to its buffer, τ = v_now − v_d being the staleness and
s(τ) = (1 + τ)^(−a) (a = 0.5 in FedBuff); once the buffer holds K updates,
x ← x + η·(1/K)·Σ s(τ_i)·Δ_i and the version increases. The finished slot is
refilled at once with a client drawn uniformly from those not training. The
whole event loop is one ``lax.scan``.

Federated Learning with Buffered Asynchronous Aggregation, Nguyen et al.,
AISTATS 2022 (arXiv 2106.06639); Asynchronous Federated Optimization, Xie et
al., 2019 (arXiv 1903.03934).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradax.federated import core


class SpeedModel(NamedTuple):
  """Duration of one local job of client n: shift_n + Exponential(scale_n)."""
  shift: jax.Array   # [N]
  scale: jax.Array   # [N]

  @property
  def num_clients(self) -> int:
    return int(self.shift.shape[0])

  def sample(self, key, ids):
    e = jax.random.exponential(key, ids.shape)
    return self.shift[ids] + self.scale[ids] * e

  def sample_host(self, rng: np.random.Generator, ids) -> np.ndarray:
    """The same law drawn with numpy, for the host-side event loops."""
    ids = np.asarray(ids)
    return (np.asarray(self.shift)[ids] +
            np.asarray(self.scale)[ids] * rng.exponential(size=ids.shape))


def tiered_speeds(num_clients: int, fractions=(0.25, 0.5, 0.25),
                  means=(4.0, 1.0, 0.25), seed: int = 0) -> SpeedModel:
  """Slow / normal / fast client tiers (FedAST's 25/50/25% demo mix).

  Each client gets shift = scale = mean/2 of its tier (mean duration = mean).
  """
  fr = np.asarray(fractions, np.float64)
  if fr.min() < 0 or not np.isclose(fr.sum(), 1.0):
    raise ValueError(f"fractions must be non-negative and sum to 1, got "
                     f"{fractions}.")
  if min(means) <= 0:
    raise ValueError(f"means must be > 0, got {means}.")
  rng = np.random.default_rng(seed)
  tier = rng.choice(len(fr), size=int(num_clients), p=fr)
  m = np.asarray(means, np.float32)[tier]
  return SpeedModel(jnp.asarray(m / 2), jnp.asarray(m / 2))


def staleness_weight(tau, exponent: float):
  """s(τ) = (1 + τ)^(−a): the polynomial staleness discount of FedAsync/FedBuff.

  τ is how many server versions passed between a job's dispatch and its
  arrival; a = 0 switches the discount off. Works on numpy and jax inputs.
  """
  return (1.0 + tau) ** (-float(exponent))


def check_staleness_exponent(exponent):
  if not float(exponent) >= 0:
    raise ValueError(f"staleness_exponent must be >= 0, got {exponent}.")
  return float(exponent)


def client_delta_fn(loss_fn, client_tx: optax.GradientTransformation,
                    local: core.LocalConfig, max_steps: int | None = None):
  """``delta(params, data, cid, key, work) -> y − params`` for one client.

  The client's local job (``core.local_train`` from ``params`` on its own
  examples, ``work`` in ``local.unit``); ``max_steps`` fixes the scan length
  so that ``work`` can vary without recompiling. Jittable and vmappable.
  """
  def delta(params, data: core.ClientData, cid, key, work):
    ex = jax.tree.map(lambda a: a[cid], data.examples)
    out = core.local_train(loss_fn, client_tx, params, ex,
                           data.num_examples[cid], work, key, local,
                           max_steps=max_steps)
    return core.tree_sub(out.params, params)
  return delta


def check_data_matches(data: core.ClientData, num_clients: int):
  if data.num_examples.shape[0] != num_clients:
    raise ValueError(f"the data holds {data.num_examples.shape[0]} clients "
                     f"but the speed model covers {num_clients}; they must "
                     "match.")


def host_streams(data: core.ClientData, num_clients: int, seed: int):
  """Checks the data against the speed model; returns the seeded numpy
  generator (clock, selection) and JAX key (local training) of a host-side
  event loop."""
  check_data_matches(data, num_clients)
  return np.random.default_rng(seed), jax.random.key(seed)


class AsyncState(NamedTuple):
  params: core.PyTree
  version: jax.Array        # int32 model version
  clock: jax.Array          # float32 simulated time
  slot_client: jax.Array    # [C] int32 client in each concurrency slot
  slot_finish: jax.Array    # [C] float32 finishing time
  slot_version: jax.Array   # [C] int32 version it started from
  slot_delta: core.PyTree   # [C, ...] its (precomputed) update
  buffer: core.PyTree       # Σ s(τ)Δ so far
  buffer_count: jax.Array   # int32
  key: jax.Array            # raw uint32 key data
  busy: jax.Array           # [N] bool clients currently training


def fedbuff(loss_fn, client_tx: optax.GradientTransformation,
            local: core.LocalConfig, speeds: SpeedModel, concurrency: int,
            buffer_size: int, server_lr: float = 1.0,
            staleness_exponent: float = 0.5, local_work: int | None = None):
  """Builds FedBuff; returns ``(init(params, data, seed), run(state, data,
  num_events) -> (state, trace))``.

  Args:
    loss_fn: masked-mean loss.
    client_tx: local optimizer.
    local: ``LocalConfig``.
    speeds: per-client ``SpeedModel`` (N clients).
    concurrency: C, clients training at once (1 ≤ C ≤ N).
    buffer_size: K ≥ 1 updates per server step (K = 1: FedAsync-style).
    server_lr: η > 0.
    staleness_exponent: a ≥ 0 in s(τ) = (1 + τ)^(−a).
    local_work: local work per job (default ``local.max_work``).

  Returns:
    ``(init, run)``; ``trace`` has per-event ``clock``, ``version``,
    ``staleness`` and ``client``.

  Example:
    >>> init, run = fedbuff(loss, optax.sgd(0.1), LocalConfig(16, "steps", 5),
    ...                     tiered_speeds(100), concurrency=20, buffer_size=5)
    >>> state, trace = run(init(params, data, 0), data, 500)
  """
  n = int(speeds.shift.shape[0])
  c = int(concurrency)
  k = int(buffer_size)
  if not 1 <= c <= n:
    raise ValueError(f"concurrency must lie in [1, {n}], got {concurrency}.")
  if k < 1:
    raise ValueError(f"buffer_size must be >= 1, got {buffer_size}.")
  if not float(server_lr) > 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr}.")
  check_staleness_exponent(staleness_exponent)
  work = int(local.max_work if local_work is None else local_work)
  job = client_delta_fn(loss_fn, client_tx, local)

  def delta_of(params, data, cid, key):
    return job(params, data, cid, key, work)

  def _check(data):
    check_data_matches(data, n)

  def init(params, data: core.ClientData, seed: int = 0):
    _check(data)
    key = jax.random.key(seed)
    key, k1, k2, k3 = jax.random.split(key, 4)
    ids = jax.random.permutation(k1, n)[:c].astype(jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(k3, i))(ids)
    deltas = jax.vmap(delta_of, (None, None, 0, 0))(params, data, ids, keys)
    return AsyncState(
        params, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), ids,
        speeds.sample(k2, ids).astype(jnp.float32), jnp.zeros((c,), jnp.int32),
        deltas, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32),
        jax.random.key_data(key), jnp.zeros((n,), bool).at[ids].set(True))

  def event(state: AsyncState, data):
    slot = jnp.argmin(state.slot_finish)
    clock = state.slot_finish[slot]
    tau = state.version - state.slot_version[slot]
    s = staleness_weight(tau.astype(jnp.float32), staleness_exponent)
    d = jax.tree.map(lambda a: a[slot], state.slot_delta)
    buf = jax.tree.map(lambda b, x: b + s * x, state.buffer, d)
    cnt = state.buffer_count + 1
    full = cnt >= k
    params = jax.tree.map(
        lambda p, b: jnp.where(full, p + server_lr * b / k, p),
        state.params, buf)
    version = state.version + full.astype(jnp.int32)
    buf = jax.tree.map(lambda b: jnp.where(full, jnp.zeros_like(b), b), buf)
    cnt = jnp.where(full, 0, cnt)
    # refill the slot with an idle client, uniformly
    finished = state.slot_client[slot]
    busy = state.busy.at[finished].set(False)
    key = jax.random.wrap_key_data(state.key)
    key, k1, k2, k3 = jax.random.split(key, 4)
    logits = jnp.where(busy, -jnp.inf, 0.0)
    new_c = jax.random.categorical(k1, logits).astype(jnp.int32)
    busy = busy.at[new_c].set(True)
    new_d = delta_of(params, data, new_c, k3)
    slot_delta = jax.tree.map(lambda a, x: a.at[slot].set(x),
                              state.slot_delta, new_d)
    dur = speeds.sample(k2, new_c[None])[0]
    new_state = AsyncState(
        params, version, clock, state.slot_client.at[slot].set(new_c),
        state.slot_finish.at[slot].set(clock + dur),
        state.slot_version.at[slot].set(version), slot_delta, buf, cnt,
        jax.random.key_data(key), busy)
    trace = {"clock": clock, "version": version, "staleness": tau,
             "client": finished}
    return new_state, trace

  def run(state: AsyncState, data: core.ClientData, num_events: int):
    _check(data)
    return jax.lax.scan(lambda s, _: event(s, data), state, None,
                        length=int(num_events))

  return init, run
