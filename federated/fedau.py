"""FedAU: online participation-interval weights for unknown participation.

Follows the reference ``IBM/fedau`` (``-weighting adaptive``) exactly. Per
client n the server keeps ``since_n`` (rounds since it last took part) and the
sum and count of its recorded intervals. In round t, for every client:

* participating: ω_n = mean of the recorded intervals (ω_n = 1 if none yet,
  using only history from before this round); it contributes ω_n·Δ_n; then the
  interval ``since_n + 1`` is recorded and ``since_n = 0``;
* not participating: ``since_n += 1``; if ``since_n ≥ K`` the interval
  ``since_n`` is recorded and ``since_n = 0`` (the cutoff K caps every interval,
  hence every ω_n, at K);
* server: x_{t+1} = x_t + η·(1/N)·Σ_n contribution_n, divided by the TOTAL N.

A Lightweight Method for Tackling Unknown Participation Statistics in
Federated Averaging, Wang and Ji, ICML 2024 (arXiv 2306.03401).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.federated import aggregators as aggs
from gradax.federated.core import FederatedAlgorithm, LocalConfig, \
    local_update_algorithm


class FedAUState(NamedTuple):
  since: jax.Array           # [N] int32 rounds since last participation
  interval_sum: jax.Array    # [N] float32 sum of recorded intervals
  interval_count: jax.Array  # [N] int32 number of recorded intervals


def fedau_weights(state: FedAUState) -> jax.Array:
  """ω_n = interval_sum / interval_count, or 1 where nothing is recorded."""
  cnt = state.interval_count
  return jnp.where(cnt > 0, state.interval_sum /
                   jnp.maximum(cnt, 1).astype(jnp.float32), 1.0)


def fedau_step(state: FedAUState, participating: jax.Array,
               cutoff: int) -> FedAUState:
  """The interval bookkeeping of one round (after ω was read)."""
  p = participating.astype(bool)
  since1 = state.since + 1
  hit = (~p) & (since1 >= cutoff)
  record = p | hit
  interval = jnp.where(p, since1, since1).astype(jnp.float32)
  return FedAUState(
      since=jnp.where(record, 0, since1).astype(jnp.int32),
      interval_sum=state.interval_sum + jnp.where(record, interval, 0.0),
      interval_count=state.interval_count + record.astype(jnp.int32))


def fedau_aggregator(cutoff: int = 100000) -> aggs.Aggregator:
  """The FedAU aggregator: (1/N)·Σ_{n∈S_t} ω_n·Δ_n, ω from past intervals.

  Args:
    cutoff: K ≥ 1; the reference default 100000 is effectively ∞, the paper
      also uses K = 50.

  Returns:
    An ``Aggregator`` whose state is a ``FedAUState`` (O(N) scalars).
  """
  if isinstance(cutoff, bool) or int(cutoff) != cutoff or int(cutoff) < 1:
    raise ValueError(
        f"cutoff K must be an integer >= 1, got {cutoff!r}.")
  cutoff = int(cutoff)

  def init(params, num_clients):
    del params
    n = int(num_clients)
    return FedAUState(jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32),
                      jnp.zeros((n,), jnp.int32))

  def apply(inp: aggs.AggregatorInput, state: FedAUState):
    n = state.since.shape[0]
    omega = fedau_weights(state)
    w = jnp.where(inp.valid, omega[inp.client_ids], 0.0) / n
    agg = aggs.weighted_sum(inp.updates, w)
    return agg, fedau_step(state, inp.participating, cutoff)

  return aggs.Aggregator(init, apply)


def fedau(loss_fn, client_tx: optax.GradientTransformation,
          local: LocalConfig, num_clients: int, server_lr: float = 1.0,
          cutoff: int = 100000, **kwargs) -> FederatedAlgorithm:
  """Builds FedAU (local SGD + participation-adaptive aggregation).

  Args:
    loss_fn: masked-mean loss.
    client_tx: local optimizer (reference: ``optax.sgd(0.1)``, I = 5 steps).
    local: ``LocalConfig``.
    num_clients: N.
    server_lr: η (reference 1.0).
    cutoff: K ≥ 1.
    **kwargs: ``capacity``, ``mesh``, ``axis_name``.

  Returns:
    A ``FederatedAlgorithm``; ``state.agg_state`` is the ``FedAUState``.

  Example:
    >>> alg = fedau(loss, optax.sgd(0.1), LocalConfig(16, "steps", 5), 100)
    >>> state = alg.init(params)
    >>> state, diag = alg.round(state, data, make_round_input(p, key, 5))
  """
  if not float(server_lr) > 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr}.")
  return local_update_algorithm(
      loss_fn, client_tx, local, num_clients=num_clients,
      aggregator=fedau_aggregator(cutoff), server_tx=optax.sgd(server_lr),
      **kwargs)
