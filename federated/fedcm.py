"""FedCM: client momentum with the server's last global direction.

Each local step uses d = α·g + (1 − α)·Δ_global, where g is the fresh
minibatch gradient and Δ_global the server's last global direction, stored
per local step: Δ_global = −(mean_S Δ_n)/(γ·I) with I local steps at local
step size γ (zero in round 1). The server averages like FedAvg. FedCM:
Federated Learning with Client-level Momentum, Xu et al., 2021
(arXiv 2106.10874); FL-Simulator default α = 0.1. This is also the client side
of FedAvg-M (Cheng et al., ICLR 2024, arXiv 2306.16504) with β = α.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gradax.federated import aggregators as aggs
from gradax.federated import core


def _direction_aggregator(inner: aggs.Aggregator, local_lr: float,
                          local_steps: int) -> aggs.Aggregator:
  def init(params, num_clients):
    return (inner.init(params, num_clients),
            jax.tree.map(jnp.zeros_like, params))

  def apply(inp, state):
    agg, inner_state = inner.apply(inp, state[0])
    direction = jax.tree.map(lambda a: -a / (local_lr * local_steps), agg)
    return agg, (inner_state, direction)

  return aggs.Aggregator(init, apply)


def fedcm(loss_fn, local_lr: float, local: core.LocalConfig, num_clients: int,
          alpha: float = 0.1, server_lr: float = 1.0,
          **kwargs) -> core.FederatedAlgorithm:
  """Builds FedCM with local SGD at ``local_lr``.

  Args:
    loss_fn: masked-mean loss.
    local_lr: γ > 0.
    local: ``LocalConfig`` with ``unit="steps"`` (I = ``local.max_work``).
    num_clients: N.
    alpha: weight α ∈ (0, 1] of the fresh gradient (1 is FedAvg).
    server_lr: η.
    **kwargs: ``capacity``, ``mesh``, ``axis_name``.

  Returns:
    ``FederatedAlgorithm``; ``state.agg_state[1]`` is Δ_global.

  Example:
    >>> alg = fedcm(loss, 0.1, LocalConfig(50, "steps", 10), 100, alpha=0.1)
  """
  if not 0 < float(alpha) <= 1:
    raise ValueError(f"alpha must lie in (0, 1], got {alpha}.")
  if not float(local_lr) > 0:
    raise ValueError(f"local_lr must be > 0, got {local_lr}.")
  if local.unit != "steps":
    raise ValueError(f"fedcm needs LocalConfig(unit='steps'), got "
                     f"{local.unit!r}.")

  def hook(g, params, ctx):
    del params
    return jax.tree.map(lambda a, d: alpha * a + (1 - alpha) * d, g,
                        ctx["direction"])

  agg = _direction_aggregator(aggs.participant_mean(), local_lr,
                              local.max_work)
  return core.local_update_algorithm(
      loss_fn, optax.sgd(local_lr), local, num_clients=num_clients,
      aggregator=agg, server_tx=optax.sgd(server_lr), grad_hook=hook,
      ctx_fn=lambda s: {"direction": s.agg_state[1]}, **kwargs)
