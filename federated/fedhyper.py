"""FedHyper: hypergradient-adapted server and client learning rates.

With the mean update of round t, Δ_t = mean_{S_t}(y_n) − x_t, the global
hypergradient is ⟨Δ_{t−1}, Δ_t⟩ (Δ_0 = 0) and agg_t = agg_{t−1} + ⟨Δ_{t−1}, Δ_t⟩.

* FedHyper-G (global learning rate): agg_t is clipped to [−0.8, 4] and
  x_{t+1} = x_t + (1 + agg_t)·Δ_t, so the effective server rate stays in
  [0.2, 5]; clients use the fixed rate γ.
* FedHyper-SL (server-side schedule of the local rate): x_{t+1} = x_t + Δ_t
  and, from round t + 1 on, every client uses γ_{t+1} = clip(γ·(1 + agg_t),
  0.001, 0.1) (the reference clips the rate, not agg).
* FedHyper-CL (client-side local rate): x_{t+1} = x_t + Δ_t; inside a
  client, with u_s = y_s − y_{s−1} the parameter change of local step s and
  u_1's predecessor taken to be Δ_{t−1}, from the second step on
    γ_s = min(1.1, 1 + c·⟨u_s, Δ_{t−1}⟩ + ⟨u_s, u_{s−1}⟩),
    β_s = clip(γ_s·β_{s−1}, 0.1, 10),  β_0 = 1,
  and step s + 1 uses the rate γ·β_s, with c = 0.1/(clients per round).

These follow the reference code ``ATP-1010/FedHyper`` (``federated_main.py``
for G and SL, ``update.py`` for CL), whose client optimizer is SGD with
momentum 0.5; here the client runs plain SGD at the scheduled rate. (In the
reference's SL branch the scheduled rates are overwritten by the base rate at
the start of every round, so they never take effect; gradax applies them, as
the paper describes.)

FedHyper: A Universal and Robust Learning Rate Scheduler for Federated
Learning with Hypergradient Descent, Wang, Wang, Li, ICLR 2024
(arXiv 2310.03156).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradax.federated import aggregators as aggs
from gradax.federated import core

VARIANTS = ("G", "SL", "CL")


class HyperState(NamedTuple):
  agg: jax.Array            # float32 scalar
  last: optax.Updates       # previous pseudo-gradient p_{t−1} = −Δ_{t−1}


def _vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                            jax.tree.leaves(b)))


def scale_by_hypergradient(low: float | None = -0.8,
                           high: float | None = 4.0,
                           scale_updates: bool = True
                           ) -> optax.GradientTransformation:
  """Server transform on the pseudo-gradient p_t = −Δ_t.

  agg_t = clip(agg_{t−1} + ⟨p_{t−1}, p_t⟩, low, high) (⟨Δ_{t−1}, Δ_t⟩ =
  ⟨p_{t−1}, p_t⟩; ``None`` bounds: no clip); the update is −(1 + agg_t)·p_t
  (FedHyper-G) or −p_t with ``scale_updates=False`` (the state still tracks
  agg_t and the last pseudo-gradient, for SL and CL).
  """
  if low is not None and high is not None and not low < 0 < high:
    raise ValueError(f"need low < 0 < high, got low={low}, high={high}.")

  def init(params):
    return HyperState(jnp.zeros((), jnp.float32),
                      jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    agg = state.agg + _vdot(state.last, updates)
    if low is not None or high is not None:
      agg = jnp.clip(agg, low, high)
    agg = agg.astype(jnp.float32)
    factor = (1.0 + agg) if scale_updates else 1.0
    u = jax.tree.map(lambda p: (-factor * p).astype(p.dtype), updates)
    return u, HyperState(agg, updates)

  return optax.GradientTransformation(init, update)


class ClientHyperState(NamedTuple):
  beta: jax.Array           # rate multiplier β_s
  last: optax.Updates       # u_{s−1} (Δ_{t−1} before the first step)
  global_update: optax.Updates   # Δ_{t−1}
  count: jax.Array          # int32 steps taken


def client_hypergradient_sgd(learning_rate: float, scale: float,
                             gamma_max: float = 1.1,
                             beta_bounds: tuple[float, float] = (0.1, 10.0)
                             ) -> optax.GradientTransformation:
  """FedHyper-CL's local SGD: u_s = −γ·β_{s−1}·g_s, β updated from step 2.

  Initialise its state with ``client_hypergradient_init(Δ_{t−1})`` (the
  server's last global update), e.g. through ``local_train``'s ``tx_init``.
  """
  lo, hi = float(beta_bounds[0]), float(beta_bounds[1])
  if not 0 < lo <= 1 <= hi:
    raise ValueError(f"beta_bounds must satisfy 0 < low <= 1 <= high, got "
                     f"{beta_bounds}.")

  def init(params):
    return client_hypergradient_init(jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    u = jax.tree.map(lambda g: (-learning_rate * state.beta * g).astype(
        g.dtype), grads)
    gamma = jnp.minimum(gamma_max, 1.0 + scale * _vdot(u, state.global_update)
                        + _vdot(u, state.last))
    first = state.count == 0        # the reference skips the first step
    beta = jnp.where(first, state.beta,
                     jnp.clip(gamma * state.beta, lo, hi)).astype(jnp.float32)
    last = core.tree_where(first, state.last, u)
    return u, ClientHyperState(beta, last, state.global_update,
                               state.count + 1)

  return optax.GradientTransformation(init, update)


def client_hypergradient_init(global_update) -> ClientHyperState:
  return ClientHyperState(jnp.ones((), jnp.float32), global_update,
                          global_update, jnp.zeros((), jnp.int32))


def fedhyper(loss_fn, local_lr: float, local: core.LocalConfig,
             num_clients: int, variant: str = "G",
             clients_per_round: int | None = None,
             local_lr_bounds: tuple[float, float] = (0.001, 0.1),
             **kwargs) -> core.FederatedAlgorithm:
  """Builds FedHyper-G, FedHyper-SL or FedHyper-CL.

  Args:
    loss_fn: masked-mean loss.
    local_lr: the clients' base SGD rate γ.
    local: ``LocalConfig``.
    num_clients: N.
    variant: ``"G"`` (server rate), ``"SL"`` (server-scheduled local rate)
      or ``"CL"`` (client-side local rate).
    clients_per_round: m in CL's c = 0.1/m (default N; the reference uses
      num_users·frac).
    local_lr_bounds: SL's clip of the local rate (reference [0.001, 0.1]).
    **kwargs: ``capacity``, ``mesh``, ``axis_name``.

  Returns:
    A ``FederatedAlgorithm``; ``state.opt_state.agg`` is agg_t and
    ``state.opt_state.last`` is −Δ_{t−1}.

  Example:
    >>> alg = fedhyper(loss, 0.01, LocalConfig(64, "epochs", 10), 100,
    ...                variant="CL", clients_per_round=10)
  """
  if not float(local_lr) > 0:
    raise ValueError(f"local_lr must be > 0, got {local_lr}.")
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  lo, hi = (float(v) for v in local_lr_bounds)
  if not 0 < lo <= hi:
    raise ValueError(f"local_lr_bounds must satisfy 0 < low <= high, got "
                     f"{local_lr_bounds}.")
  m = int(num_clients if clients_per_round is None else clients_per_round)
  if m < 1:
    raise ValueError(f"clients_per_round must be >= 1, got "
                     f"{clients_per_round}.")
  client_tx = optax.sgd(local_lr)
  hook = ctx_fn = tx_init = None
  if variant == "G":
    server_tx = scale_by_hypergradient()
  else:
    server_tx = scale_by_hypergradient(None, None, scale_updates=False)
  if variant == "SL":
    def hook(g, params, ctx):
      del params
      lr = jnp.clip(local_lr * (1.0 + ctx["agg"]), lo, hi)
      return jax.tree.map(lambda a: a * (lr / local_lr), g)

    def ctx_fn(state):
      return {"agg": state.opt_state.agg}
  elif variant == "CL":
    client_tx = client_hypergradient_sgd(local_lr, 0.1 / m)

    def ctx_fn(state):
      return {"global_update": jax.tree.map(jnp.negative,
                                            state.opt_state.last)}

    def tx_init(params, ctx):
      del params
      return client_hypergradient_init(ctx["global_update"])
  return core.local_update_algorithm(
      loss_fn, client_tx, local, num_clients=num_clients,
      aggregator=aggs.participant_mean(), server_tx=server_tx,
      grad_hook=hook, ctx_fn=ctx_fn, client_tx_init=tx_init, **kwargs)
