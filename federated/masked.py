"""Masked aggregation ("Every Parameter Matters").

Client i trains the sub-model θ ⊙ m_i (its loss sees θ ⊙ m_i, so coordinates
outside its mask get no gradient). The server averages each coordinate only
over the clients that trained it:

  θ_j ← θ_j + Σ_{i∈S} m_ij·Δ_ij / max(Σ_{i∈S} m_ij, 1),

so a coordinate that nobody covers stays frozen. Convergence needs a minimum
coverage index Γ_min = min_j Σ_i m_ij ≥ 1. Every Parameter Matters: Ensuring
the Convergence of Federated Learning with Dynamic Heterogeneous Models
Reduction, Zhou et al., NeurIPS 2023 (arXiv 2310.08670).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradax.federated import aggregators as aggs
from gradax.federated import core


def masked_mean(client_masks) -> aggs.Aggregator:
  """Coordinate-wise mean over the participants whose mask covers it.

  Args:
    client_masks: pytree like the params with a leading ``[N]`` axis of 0/1.
  """
  masks = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), client_masks)

  def init(params, num_clients):
    del params, num_clients
    return ()

  def apply(inp, state):
    def f(u, m):
      mm = m[inp.client_ids] * aggs._bcast(inp.valid, m[inp.client_ids])
      cover = jnp.sum(mm, 0)
      return (jnp.sum(mm * u, 0) / jnp.maximum(cover, 1.0)).astype(u.dtype)
    return jax.tree.map(f, inp.updates, masks), state

  return aggs.Aggregator(init, apply)


def coverage(client_masks) -> int:
  """Γ_min = min_j Σ_i m_ij over all coordinates (the minimum coverage index)."""
  return int(min(np.asarray(m).sum(0).min()
                 for m in jax.tree.leaves(client_masks)))


def masked_fedavg(loss_fn, client_tx: optax.GradientTransformation,
                  local: core.LocalConfig, client_masks, server_lr: float = 1.0,
                  **kwargs) -> core.FederatedAlgorithm:
  """FedAvg over heterogeneous sub-models with masked aggregation.

  Args:
    loss_fn: masked-mean loss.
    client_tx: local optimizer.
    local: ``LocalConfig``.
    client_masks: pytree like the params with leading ``[N]`` 0/1 masks.
    server_lr: η.
    **kwargs: ``capacity``, ``mesh``, ``axis_name``.

  Returns:
    A ``FederatedAlgorithm``.

  Example:
    >>> masks = {"w": np.stack([np.ones(d), half])}
    >>> alg = masked_fedavg(loss, optax.sgd(0.1), LocalConfig(8), masks)
  """
  leaves = jax.tree.leaves(client_masks)
  n = leaves[0].shape[0]
  masks = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), client_masks)
  vg = jax.value_and_grad(loss_fn)

  def grad_fn(params, batch, ctx):
    m = ctx["mask"]
    return vg(jax.tree.map(jnp.multiply, params, m), batch)

  def client_ctx(state, ids):
    del state
    return {"mask": jax.tree.map(lambda m: m[ids], masks)}

  return core.local_update_algorithm(
      loss_fn, client_tx, local, num_clients=n, aggregator=masked_mean(masks),
      server_tx=optax.sgd(server_lr), grad_fn=grad_fn,
      client_ctx_fn=client_ctx, **kwargs)
