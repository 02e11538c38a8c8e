"""Decentralised FedAvg and DFedSAM: local steps, then gossip over W.

There is no server. Every client i keeps its own model x_i. Each round the
active clients run K local steps from x_i (plain SGD for D-FedAvg; SAM steps
y ← y − η·∇F_i(y + ρ·∇F_i(y)/‖∇F_i(y)‖) for DFedSAM) to get z_i (inactive
clients keep z_i = x_i), then gossip Q times with a doubly stochastic mixing
matrix W: x^{t+1} = W^Q·z on the stacked client axis (Q > 1 is DFedSAM-MGS).
Improving the Model Consistency of Decentralized Federated Learning, Shi et
al., ICML 2023 (arXiv 2302.04083).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradax.federated import core


class DecentralizedState(NamedTuple):
  params: core.PyTree      # [N, ...] one model per client
  round: jax.Array


def mixing_matrix(topology: str, num_clients: int) -> np.ndarray:
  """Doubly stochastic W for ``"ring"``, ``"full"`` or ``"exponential"``.

  ring: each node averages itself and its two neighbours (1/3 each);
  full: 1/N everywhere; exponential: node i talks to i + 2^k (mod N),
  uniform weights over itself and those peers (symmetrised).
  """
  n = int(num_clients)
  if n < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  if topology == "full":
    return np.full((n, n), 1.0 / n)
  if topology == "ring":
    w = np.zeros((n, n))
    for i in range(n):
      for j in (i - 1, i, i + 1):
        w[i, j % n] += 1.0 / 3
    return w
  if topology == "exponential":
    adj = np.eye(n, dtype=bool)
    k = 1
    while k < n:
      for i in range(n):
        adj[i, (i + k) % n] = adj[(i + k) % n, i] = True
      k *= 2
    deg = adj.sum(1).max()
    w = adj / deg
    w[np.diag_indices(n)] += 1.0 - w.sum(1)
    return w
  raise ValueError(f"topology must be 'ring', 'full' or 'exponential', got "
                   f"{topology!r}.")


def check_mixing_matrix(w) -> np.ndarray:
  w = np.asarray(w, np.float64)
  if w.ndim != 2 or w.shape[0] != w.shape[1]:
    raise ValueError(f"mixing matrix must be square, got shape {w.shape}.")
  if (w < -1e-12).any() or not (np.allclose(w.sum(0), 1, atol=1e-6)
                                and np.allclose(w.sum(1), 1, atol=1e-6)):
    raise ValueError("mixing matrix must be doubly stochastic (non-negative, "
                     "rows and columns summing to 1).")
  return w


def decentralized(loss_fn, client_tx: optax.GradientTransformation,
                  local: core.LocalConfig, mixing, gossip_steps: int = 1,
                  sam_rho: float = 0.0, mesh=None,
                  axis_name: str = "clients") -> core.FederatedAlgorithm:
  """Builds D-FedAvg (``sam_rho=0``) or DFedSAM(-MGS) (``sam_rho>0``).

  Args:
    loss_fn: masked-mean loss.
    client_tx: local optimizer.
    local: ``LocalConfig``.
    mixing: ``[N, N]`` doubly stochastic matrix (see ``mixing_matrix``).
    gossip_steps: Q ≥ 1 gossip steps per round.
    sam_rho: SAM radius ρ ≥ 0 (0: plain local SGD).
    mesh, axis_name: optional client sharding.

  Returns:
    ``FederatedAlgorithm``; ``init(params)`` copies params to every client.
    The consensus model is ``state.params`` averaged over axis 0.

  Example:
    >>> w = mixing_matrix("ring", 16)
    >>> alg = decentralized(loss, optax.sgd(0.1), LocalConfig(8), w, 2, 0.05)
  """
  w = check_mixing_matrix(mixing)
  q = int(gossip_steps)
  if q < 1:
    raise ValueError(f"gossip_steps must be >= 1, got {gossip_steps}.")
  wq = jnp.asarray(np.linalg.matrix_power(w, q), jnp.float32)
  n = w.shape[0]
  gfn = core.sam_grad_fn(loss_fn, sam_rho) if sam_rho > 0 else None

  def init(params):
    return DecentralizedState(
        jax.tree.map(lambda p: jnp.broadcast_to(p, (n,) + p.shape), params),
        jnp.zeros((), jnp.int32))

  def one_client(x, ex, n_k, work_k, key_k, active):
    out = core.local_train(loss_fn, client_tx, x, ex, n_k,
                           jnp.where(active, work_k, 0), key_k, local,
                           grad_fn=gfn)
    return out.params, out.mean_loss

  def round_fn(state, data: core.ClientData, inputs: core.RoundInput):
    core.check_round_input(data, inputs)
    if data.num_examples.shape[0] != n:
      raise ValueError(f"the data holds {data.num_examples.shape[0]} clients "
                       f"but the mixing matrix is {n}x{n}.")
    ids = jnp.arange(n, dtype=jnp.int32)
    mapped = core.map_clients(one_client, (0, 0, 0, 0, 0, 0), mesh, axis_name)
    z, losses = mapped(state.params, data.examples, data.num_examples,
                       inputs.work, core.client_keys(inputs.key, ids),
                       inputs.participating.astype(bool))
    mixed = jax.tree.map(
        lambda a: jnp.einsum("ij,j...->i...", wq, a.astype(jnp.float32))
        .astype(a.dtype), z)
    act = inputs.participating.astype(jnp.float32)
    diag = {"client_loss": jnp.sum(losses * act) / jnp.maximum(act.sum(), 1),
            "consensus_distance": consensus_distance(mixed)}
    return DecentralizedState(mixed, state.round + 1), diag

  return core.FederatedAlgorithm(init, round_fn)


def consensus_distance(stacked) -> jax.Array:
  """(1/N)·Σ_i ‖x_i − x̄‖², the spread of the client models."""
  sq = [jnp.sum(jnp.square(a - a.mean(0, keepdims=True))) / a.shape[0]
        for a in jax.tree.leaves(stacked)]
  return sum(sq)


def dfedavg(loss_fn, client_tx, local, mixing, **kwargs):
  """Decentralised FedAvg: ``decentralized`` with plain local SGD."""
  return decentralized(loss_fn, client_tx, local, mixing, sam_rho=0.0,
                       **kwargs)


def dfedsam(loss_fn, client_tx, local, mixing, rho: float = 0.05,
            gossip_steps: int = 1, **kwargs):
  """DFedSAM (Q = 1) and DFedSAM-MGS (Q > 1)."""
  if not float(rho) > 0:
    raise ValueError(f"rho must be > 0 for DFedSAM, got {rho}.")
  return decentralized(loss_fn, client_tx, local, mixing, gossip_steps, rho,
                       **kwargs)
