"""FedProx: a proximal term on the client, partial work kept on the server.

Client k approximately minimises h_k(w) = F_k(w) + (μ/2)·‖w − x_t‖², i.e. its
local optimizer sees the gradient g + μ·(w − x_t). The server averages the
clients' solutions like FedAvg; stragglers that did only part of their work
are kept (FedAvg drops them). Federated Optimization in Heterogeneous
Networks, Li et al., MLSys 2020 (arXiv 1812.06127).
"""

from __future__ import annotations

import jax
import optax

from gradax.federated import aggregators as aggs
from gradax.federated.core import FederatedAlgorithm, LocalConfig, \
    local_update_algorithm


def proximal_hook(mu: float):
  """Gradient hook g ↦ g + μ·(w − anchor) (the squared-norm proximal term)."""
  if not float(mu) >= 0:
    raise ValueError(f"mu must be >= 0, got {mu}.")

  def hook(grads, params, ctx):
    return jax.tree.map(lambda g, w, a: g + mu * (w - a), grads, params,
                        ctx["anchor"])
  return hook


def fedprox(loss_fn, client_tx: optax.GradientTransformation,
            local: LocalConfig, num_clients: int, mu: float = 0.01,
            server_lr: float = 1.0, aggregator: aggs.Aggregator | None = None,
            **kwargs) -> FederatedAlgorithm:
  """Builds FedProx.

  Pass each round's per-client local work in ``RoundInput.work``: stragglers
  get fewer epochs and are still aggregated (see
  ``participation.fedprox_stragglers``).

  Args:
    loss_fn: masked-mean loss.
    client_tx: local optimizer (the reference uses ``optax.sgd(lr)``).
    local: ``LocalConfig``.
    num_clients: N.
    mu: proximal weight μ ≥ 0 (μ = 0 is FedAvg that keeps stragglers).
    server_lr: η.
    aggregator: default ``example_weighted_mean()`` (the reference's
      sample-weighted average of the client solutions).
    **kwargs: ``capacity``, ``mesh``, ``axis_name``.

  Returns:
    A ``FederatedAlgorithm``.

  Example:
    >>> alg = fedprox(loss, optax.sgd(0.01), LocalConfig(10, "epochs", 20),
    ...               30, mu=1.0)
    >>> state, diag = alg.round(alg.init(params), data, inputs)
  """
  if not float(server_lr) > 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr}.")
  return local_update_algorithm(
      loss_fn, client_tx, local, num_clients=num_clients,
      aggregator=aggregator or aggs.example_weighted_mean(),
      server_tx=optax.sgd(server_lr), grad_hook=proximal_hook(mu), **kwargs)
