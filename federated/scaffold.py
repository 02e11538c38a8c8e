"""SCAFFOLD: control variates correct client drift.

Client i (K local steps of size γ from y = x): y ← y − γ·(g_i(y) − c_i + c);
then c_i⁺ = c_i − c + (x − y)/(K·γ) (option II); it sends Δy_i = y − x and
Δc_i = c_i⁺ − c_i. Server: x ← x + η·mean_{S}(Δy_i), c ← c + (1/N)·Σ_{S} Δc_i
(= (|S|/N)·mean_S Δc_i). Clients are stateful: the simulation stores every
c_i, O(N·d). SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning, Karimireddy et al., ICML 2020 (arXiv 1910.06378).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.federated import core


class ScaffoldState(NamedTuple):
  params: core.PyTree
  c: core.PyTree           # server control variate
  c_clients: core.PyTree   # [N, ...] client control variates
  round: jax.Array


def _scaffold_hook(grads, params, ctx):
  del params
  return jax.tree.map(lambda g, ci, c: g - ci + c, grads, ctx["c_i"],
                      ctx["c"])


def scaffold(loss_fn, local_lr: float, local: core.LocalConfig,
             num_clients: int, server_lr: float = 1.0,
             capacity: int | None = None, mesh=None,
             axis_name: str = "clients") -> core.FederatedAlgorithm:
  """Builds SCAFFOLD (option II control variates, local SGD).

  Args:
    loss_fn: masked-mean loss.
    local_lr: γ > 0 of the local SGD.
    local: ``LocalConfig``.
    num_clients: N.
    server_lr: η > 0.
    capacity, mesh, axis_name: as in ``local_update_algorithm``.

  Returns:
    A ``FederatedAlgorithm`` whose state is a ``ScaffoldState``.

  Example:
    >>> alg = scaffold(loss, 0.01, LocalConfig(10, "epochs", 20), 30)
    >>> state, diag = alg.round(alg.init(params), data, inputs)
  """
  if not float(local_lr) > 0:
    raise ValueError(f"local_lr must be > 0, got {local_lr}.")
  if not float(server_lr) > 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr}.")
  n_total = int(num_clients)
  if n_total < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  cap = n_total if capacity is None else int(capacity)
  tx = optax.sgd(local_lr)

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    per_client = jax.tree.map(
        lambda p: jnp.zeros((n_total,) + p.shape, p.dtype), params)
    return ScaffoldState(params, zeros, per_client, jnp.zeros((), jnp.int32))

  def one_client(x, ex, n_k, work_k, key_k, c_i, c):
    out = core.local_train(loss_fn, tx, x, ex, n_k, work_k, key_k, local,
                           _scaffold_hook, {"c_i": c_i, "c": c})
    k = jnp.maximum(out.num_steps, 1).astype(jnp.float32)
    new_ci = jax.tree.map(
        lambda ci, cc, xx, yy: jnp.where(out.num_steps > 0,
                                         ci - cc + (xx - yy) / (k * local_lr),
                                         ci), c_i, c, x, out.params)
    dy = core.tree_sub(out.params, x)
    dc = core.tree_sub(new_ci, c_i)
    return dy, dc, out.mean_loss

  def round_fn(state: ScaffoldState, data: core.ClientData,
               inputs: core.RoundInput):
    core.check_round_input(data, inputs)
    part = inputs.participating.astype(bool) & (data.num_examples > 0)
    ids, valid, overflow = core.select_clients(part, cap)
    ex = jax.tree.map(lambda a: a[ids], data.examples)
    c_i = jax.tree.map(lambda a: a[ids], state.c_clients)
    mapped = core.map_clients(one_client, (None, 0, 0, 0, 0, 0, None), mesh,
                              axis_name)
    dy, dc, losses = mapped(state.params, ex, data.num_examples[ids],
                            inputs.work[ids],
                            core.client_keys(inputs.key, ids), c_i, state.c)
    dy = core.tree_where_clients(valid, dy)
    dc = core.tree_where_clients(valid, dc)
    cnt = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    params = jax.tree.map(
        lambda x, d: x + server_lr * jnp.sum(d, 0) / cnt, state.params, dy)
    c = jax.tree.map(lambda cc, d: cc + jnp.sum(d, 0) / n_total, state.c, dc)
    # scatter the new client variates (invalid slots add 0)
    c_clients = jax.tree.map(lambda a, d: a.at[ids].add(d), state.c_clients,
                             dc)
    vf = valid.astype(jnp.float32)
    diag = {"num_participants": jnp.sum(valid.astype(jnp.int32)),
            "client_loss": jnp.sum(losses * vf) / cnt, "overflow": overflow}
    return ScaffoldState(params, c, c_clients, state.round + 1), diag

  return core.FederatedAlgorithm(init, round_fn)
