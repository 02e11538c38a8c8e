"""FedAMD: anchor sampling with SARAH-type local recursions.

Each participating client is an **anchor** with probability p (p ≥ 1: every
sampled client is an anchor in rounds t with t mod p = 0, a miner otherwise).
Anchors compute a large-batch gradient g_n at x_t (here: over all their
examples), which the server stores (O(N·d)). With the global direction
v = (1/N)·Σ_n g_n (the stored gradients, as of the start of the round),
miners run K steps of the SARAH recursion from y_0 = x_t, v_0 = v:
y_1 = y_0 − γ·v_0; v_k = v_{k−1} − ∇f_n(y_{k−1}; ξ_k) + ∇f_n(y_k; ξ_k),
y_{k+1} = y_k − γ·v_k; and upload x_t − y_K. Server:
x_{t+1} = x_t − η_g·mean_{miners}(x_t − y_K). Anchor-sampled Federated
Learning, F. Wu et al., ICML 2023 (``HarliWu/FedAMD``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradax.federated import core


class FedAMDState(NamedTuple):
  params: core.PyTree
  anchor_grads: core.PyTree   # [N, ...] stored large-batch gradients
  round: jax.Array


def fedamd(loss_fn, local_lr: float, local: core.LocalConfig,
           num_clients: int, anchor_prob: float = 0.2,
           server_lr: float = 1.0, capacity: int | None = None, mesh=None,
           axis_name: str = "clients") -> core.FederatedAlgorithm:
  """Builds FedAMD.

  Args:
    loss_fn: masked-mean loss.
    local_lr: γ > 0 of the miners.
    local: ``LocalConfig`` with ``unit="steps"`` (K = work).
    num_clients: N.
    anchor_prob: p ∈ (0, 1) a probability; p ≥ 1 an integer period.
    server_lr: η_g > 0.
    capacity, mesh, axis_name: as in ``local_update_algorithm``.

  Returns:
    A ``FederatedAlgorithm`` with ``FedAMDState``.

  Example:
    >>> alg = fedamd(loss, 0.01, LocalConfig(64, "steps", 10), 100, 0.2)
  """
  if not float(local_lr) > 0:
    raise ValueError(f"local_lr must be > 0, got {local_lr}.")
  if not float(anchor_prob) > 0 or (anchor_prob >= 1 and
                                    int(anchor_prob) != anchor_prob):
    raise ValueError(f"anchor_prob must lie in (0, 1) or be an integer "
                     f"period >= 1, got {anchor_prob}.")
  if local.unit != "steps":
    raise ValueError(f"fedamd needs LocalConfig(unit='steps'), got "
                     f"{local.unit!r}.")
  n_total = int(num_clients)
  cap = n_total if capacity is None else int(capacity)
  grad = jax.grad(loss_fn)
  k_max = local.max_work

  def init(params):
    return FedAMDState(params, jax.tree.map(
        lambda p: jnp.zeros((n_total,) + p.shape, p.dtype), params),
                       jnp.zeros((), jnp.int32))

  def full_grad(x, ex, n_k):
    m = jax.tree.leaves(ex)[0].shape[0]
    batch = dict(ex, mask=(jnp.arange(m) < n_k).astype(jnp.float32))
    return grad(x, batch)

  def miner(x, ex, n_k, work_k, key_k, v0):
    batch_at = core.make_batcher(local, ex, n_k, key_k)
    budget = jnp.where(n_k > 0, work_k, 0)
    y1 = jax.tree.map(lambda a, v: a - local_lr * v, x, v0)
    y1 = core.tree_where(budget >= 1, y1, x)

    def step(carry, s):
      y_prev, y, v = carry
      b = batch_at(s)
      v_new = jax.tree.map(lambda vi, g0, g1: vi - g0 + g1, v,
                           grad(y_prev, b), grad(y, b))
      y_new = jax.tree.map(lambda a, vi: a - local_lr * vi, y, v_new)
      active = s < budget
      return (core.tree_where(active, y, y_prev),
              core.tree_where(active, y_new, y),
              core.tree_where(active, v_new, v)), None

    (_, y, _), _ = jax.lax.scan(step, (x, y1, v0),
                                jnp.arange(1, max(k_max, 1), dtype=jnp.int32))
    return core.tree_sub(y, x)

  def one_client(x, ex, n_k, work_k, key_k, v0):
    return full_grad(x, ex, n_k), miner(x, ex, n_k, work_k, key_k, v0)

  def round_fn(state: FedAMDState, data: core.ClientData,
               inputs: core.RoundInput):
    core.check_round_input(data, inputs)
    part = inputs.participating.astype(bool) & (data.num_examples > 0)
    ids, valid, overflow = core.select_clients(part, cap)
    keys = core.client_keys(inputs.key, ids)
    if anchor_prob >= 1:
      is_anchor = jnp.broadcast_to(state.round % int(anchor_prob) == 0,
                                   ids.shape)
    else:
      is_anchor = jax.vmap(lambda k: jax.random.bernoulli(
          jax.random.fold_in(k, -1), anchor_prob))(keys)
    anchor = valid & is_anchor
    mine = valid & ~is_anchor
    v0 = jax.tree.map(lambda g: jnp.sum(g, 0) / n_total, state.anchor_grads)
    mapped = core.map_clients(one_client, (None, 0, 0, 0, 0, None), mesh,
                              axis_name)
    g, d = mapped(state.params, jax.tree.map(lambda a: a[ids], data.examples),
                  data.num_examples[ids], inputs.work[ids], keys, v0)
    # anchors overwrite their stored gradient (invalid slots write nothing)
    stored = jax.tree.map(
        lambda st, gi: st.at[jnp.where(anchor, ids, n_total)].set(
            gi, mode="drop"), state.anchor_grads, g)
    d = core.tree_where_clients(mine, d)
    cnt = jnp.sum(mine.astype(jnp.float32))
    params = jax.tree.map(
        lambda x, di: x + server_lr * jnp.sum(di, 0) / jnp.maximum(cnt, 1.0),
        state.params, d)
    diag = {"num_participants": jnp.sum(valid.astype(jnp.int32)),
            "num_anchors": jnp.sum(anchor.astype(jnp.int32)),
            "num_miners": jnp.sum(mine.astype(jnp.int32)),
            "overflow": overflow}
    return FedAMDState(params, stored, state.round + 1), diag

  return core.FederatedAlgorithm(init, round_fn)
