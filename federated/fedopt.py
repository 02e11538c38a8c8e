"""FedOpt: any optax optimizer on the server's pseudo-gradient.

The server treats −Σ_{S_t} w_n·Δ_n (example-weighted mean update, negated) as
a gradient and steps its optimizer: FedAdam, FedYogi, FedAdagrad and FedAvgM
(momentum SGD). τ is the server optimizer's ε and sets its adaptivity.
Adaptive Federated Optimization, Reddi et al., ICLR 2021 (arXiv 2003.00295).
Defaults follow Flower 1.42's strategies.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.federated import aggregators as aggs
from gradax.federated.core import FederatedAlgorithm, LocalConfig, \
    local_update_algorithm


def fedopt(loss_fn, client_tx: optax.GradientTransformation,
           local: LocalConfig, num_clients: int,
           server_tx: optax.GradientTransformation,
           aggregator: aggs.Aggregator | None = None,
           **kwargs) -> FederatedAlgorithm:
  """Builds FedOpt with an arbitrary optax ``server_tx``.

  Args:
    loss_fn: masked-mean loss.
    client_tx: local optimizer.
    local: ``LocalConfig``.
    num_clients: N.
    server_tx: any optax optimizer, applied to the pseudo-gradient.
    aggregator: default ``example_weighted_mean()``.
    **kwargs: ``capacity``, ``mesh``, ``axis_name``.

  Returns:
    A ``FederatedAlgorithm``.

  Example:
    >>> alg = fedopt(loss, optax.sgd(0.1), LocalConfig(10), 100,
    ...              optax.adam(0.1, b1=0.9, b2=0.99, eps=1e-3))
  """
  return local_update_algorithm(
      loss_fn, client_tx, local, num_clients=num_clients,
      aggregator=aggregator or aggs.example_weighted_mean(),
      server_tx=server_tx, **kwargs)


def fedadam(loss_fn, client_tx, local, num_clients, eta: float = 0.1,
            beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
            **kwargs) -> FederatedAlgorithm:
  """FedAdam: server Adam(η, β1, β2, ε=τ) on the pseudo-gradient."""
  return fedopt(loss_fn, client_tx, local, num_clients,
                optax.adam(eta, b1=beta_1, b2=beta_2, eps=tau), **kwargs)


def fedyogi(loss_fn, client_tx, local, num_clients, eta: float = 1e-2,
            beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
            **kwargs) -> FederatedAlgorithm:
  """FedYogi: server Yogi(η, β1, β2, ε=τ) on the pseudo-gradient."""
  return fedopt(loss_fn, client_tx, local, num_clients,
                optax.yogi(eta, b1=beta_1, b2=beta_2, eps=tau), **kwargs)


class AdagradState(NamedTuple):
  sum_sq: optax.Updates


def scale_by_server_adagrad(tau: float) -> optax.GradientTransformation:
  """v ← v + g², u = g/(√v + τ) (τ added after the square root, as in FedOpt)."""
  if not float(tau) > 0:
    raise ValueError(f"tau must be > 0, got {tau}.")

  def init(params):
    return AdagradState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    v = jax.tree.map(lambda s, g: s + jnp.square(g), state.sum_sq, updates)
    u = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + tau), updates, v)
    return u, AdagradState(v)

  return optax.GradientTransformation(init, update)


def fedadagrad(loss_fn, client_tx, local, num_clients, eta: float = 0.1,
               tau: float = 1e-3, **kwargs) -> FederatedAlgorithm:
  """FedAdagrad: v ← v + g², x ← x − η·g/(√v + τ) (Reddi et al.)."""
  tx = optax.chain(scale_by_server_adagrad(tau), optax.scale(-eta))
  return fedopt(loss_fn, client_tx, local, num_clients, tx, **kwargs)


def fedavgm(loss_fn, client_tx, local, num_clients,
            server_learning_rate: float = 1.0, server_momentum: float = 0.0,
            **kwargs) -> FederatedAlgorithm:
  """FedAvgM: server SGD with momentum on the pseudo-gradient."""
  return fedopt(loss_fn, client_tx, local, num_clients,
                optax.sgd(server_learning_rate,
                          momentum=server_momentum or None), **kwargs)
