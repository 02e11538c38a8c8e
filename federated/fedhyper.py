"""FedHyper: hypergradient-adapted server (and client) learning rates.

FedHyper-G: with the mean update Δ_t = mean_S(y_n) − x_t,
  agg_t = clip(agg_{t−1} + ⟨Δ_{t−1}, Δ_t⟩, −0.8, 4),  x_{t+1} = x_t + (1 + agg_t)·Δ_t,
so the effective global learning rate stays in [0.2, 5]. FedHyper-SL also
sets every client's local rate to clip(lr·(1 + agg), 0.001, 0.1) (applied
here as a gradient scale). FedHyper: A Universal and Robust Learning Rate
Scheduler for Federated Learning with Hypergradient Descent, Wang, Wang, Li,
ICLR 2024 (arXiv 2310.03156).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.federated import aggregators as aggs
from gradax.federated import core


class HyperState(NamedTuple):
  agg: jax.Array            # float32 scalar
  last: optax.Updates       # previous pseudo-gradient


def scale_by_hypergradient(low: float = -0.8, high: float = 4.0
                           ) -> optax.GradientTransformation:
  """Server transform on the pseudo-gradient p_t = −Δ_t: u = −(1 + agg_t)·p_t.

  ⟨Δ_{t−1}, Δ_t⟩ = ⟨p_{t−1}, p_t⟩, so the state keeps the last p.
  """
  if not low < 0 < high:
    raise ValueError(f"need low < 0 < high, got low={low}, high={high}.")

  def init(params):
    return HyperState(jnp.zeros((), jnp.float32),
                      jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(state.last),
                                             jax.tree.leaves(updates)))
    agg = jnp.clip(state.agg + dot, low, high).astype(jnp.float32)
    u = jax.tree.map(lambda p: -(1.0 + agg) * p, updates)
    return u, HyperState(agg, updates)

  return optax.GradientTransformation(init, update)


def fedhyper(loss_fn, local_lr: float, local: core.LocalConfig,
             num_clients: int, client_schedule: bool = False,
             **kwargs) -> core.FederatedAlgorithm:
  """Builds FedHyper-G (``client_schedule=False``) or FedHyper-SL.

  Args:
    loss_fn: masked-mean loss.
    local_lr: initial local SGD rate.
    local: ``LocalConfig``.
    num_clients: N.
    client_schedule: also scale the clients' rate by (1 + agg), clipped to
      [0.001, 0.1] (FedHyper-SL).
    **kwargs: ``capacity``, ``mesh``, ``axis_name``.

  Returns:
    A ``FederatedAlgorithm``; ``state.opt_state.agg`` is agg_t.

  Example:
    >>> alg = fedhyper(loss, 0.01, LocalConfig(64, "epochs", 10), 100)
  """
  if not float(local_lr) > 0:
    raise ValueError(f"local_lr must be > 0, got {local_lr}.")
  hook = ctx_fn = None
  if client_schedule:
    def hook(g, params, ctx):
      del params
      lr = jnp.clip(local_lr * (1.0 + ctx["agg"]), 0.001, 0.1)
      return jax.tree.map(lambda a: a * (lr / local_lr), g)

    def ctx_fn(state):
      return {"agg": state.opt_state.agg}
  return core.local_update_algorithm(
      loss_fn, optax.sgd(local_lr), local, num_clients=num_clients,
      aggregator=aggs.participant_mean(), server_tx=scale_by_hypergradient(),
      grad_hook=hook, ctx_fn=ctx_fn, **kwargs)
