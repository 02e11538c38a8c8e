"""FedAvg: example-weighted averaging of local SGD updates.

x_{t+1} = x_t + η · Σ_{n∈S_t} (m_n / Σ_{k∈S_t} m_k) · (y_n − x_t),

where y_n is client n's model after its local work from x_t and m_n its number
of examples. Communication-Efficient Learning of Deep Networks from
Decentralized Data, McMahan et al., 2017 (arXiv 1602.05629).
"""

from __future__ import annotations

import optax

from gradax.federated import aggregators as aggs
from gradax.federated.core import FederatedAlgorithm, LocalConfig, \
    local_update_algorithm


def fedavg(loss_fn, client_tx: optax.GradientTransformation,
           local: LocalConfig, num_clients: int, server_lr: float = 1.0,
           aggregator: aggs.Aggregator | None = None,
           **kwargs) -> FederatedAlgorithm:
  """Builds FedAvg.

  Args:
    loss_fn: ``loss_fn(params, batch)``, a masked mean over ``batch["mask"]``.
    client_tx: local optimizer, e.g. ``optax.sgd(0.01)``.
    local: ``LocalConfig`` (batch size, unit, max local work).
    num_clients: N.
    server_lr: η (server ``optax.sgd``).
    aggregator: default ``example_weighted_mean()``.
    **kwargs: ``capacity``, ``mesh``, ``axis_name`` of
      ``local_update_algorithm``.

  Returns:
    A ``FederatedAlgorithm``.

  Example:
    >>> alg = fedavg(loss, optax.sgd(0.1), LocalConfig(10, "steps", 5), 100)
    >>> state = alg.init(params)
    >>> state, diag = alg.round(state, data, make_round_input(p, key, 5))
  """
  if not float(server_lr) > 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr}.")
  return local_update_algorithm(
      loss_fn, client_tx, local, num_clients=num_clients,
      aggregator=aggregator or aggs.example_weighted_mean(),
      server_tx=optax.sgd(server_lr), **kwargs)
