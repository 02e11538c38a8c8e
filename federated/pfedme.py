"""pFedMe: personalised FL with Moreau envelopes.

Objective min_w (1/N)·Σ_i F_i(w), F_i(w) = min_θ f_i(θ) + (λ/2)‖θ − w‖².
Client i, for each of R local rounds (one minibatch D each): starting from
θ = w_i, K steps θ ← θ − plr·(∇f_i(θ; D) + λ(θ − w_i)) give θ̂; then
w_i ← w_i − η·λ·(w_i − θ̂). Server: w ← (1 − β)·w + β·Σ_S (n_i/Σn)·w_i.
(Here θ restarts from w_i at every local round.) Personalized Federated
Learning with Moreau Envelopes, Dinh, Tran, Nguyen, NeurIPS 2020
(arXiv 2006.08848).
"""

from __future__ import annotations

import jax
import optax

from gradax.federated import aggregators as aggs
from gradax.federated import core


def personalize(loss_fn, w, batch, lam: float, plr: float, inner_steps: int):
  """θ̂ ≈ argmin_θ f(θ; batch) + (λ/2)‖θ − w‖² by ``inner_steps`` GD steps."""
  g_fn = jax.grad(loss_fn)

  def step(theta, _):
    g = g_fn(theta, batch)
    return jax.tree.map(lambda t, gi, wi: t - plr * (gi + lam * (t - wi)),
                        theta, g, w), None

  theta, _ = jax.lax.scan(step, w, None, length=inner_steps)
  return theta


def pfedme(loss_fn, local: core.LocalConfig, num_clients: int,
           lam: float = 15.0, plr: float = 0.1, inner_steps: int = 5,
           lr: float = 0.005, beta: float = 1.0,
           **kwargs) -> core.FederatedAlgorithm:
  """Builds pFedMe; ``local`` counts local rounds R (one minibatch each).

  Args:
    loss_fn: masked-mean loss.
    local: ``LocalConfig`` (``max_work`` = R in "steps").
    num_clients: N.
    lam: λ > 0.
    plr: personal step size.
    inner_steps: K ≥ 1.
    lr: η, the local-model step.
    beta: β ∈ (0, 1], the server mixing.
    **kwargs: ``capacity``, ``mesh``, ``axis_name``.

  Returns:
    A ``FederatedAlgorithm``; use ``personalize`` for θ_i.

  Example:
    >>> alg = pfedme(loss, LocalConfig(20, "steps", 20), 20, lam=15.0)
  """
  for name, v in (("lam", lam), ("plr", plr), ("lr", lr)):
    if not float(v) > 0:
      raise ValueError(f"{name} must be > 0, got {v}.")
  if not 0 < float(beta) <= 1:
    raise ValueError(f"beta must lie in (0, 1], got {beta}.")
  if int(inner_steps) < 1:
    raise ValueError(f"inner_steps must be >= 1, got {inner_steps}.")

  def grad_fn(w, batch, ctx):
    del ctx
    theta = personalize(loss_fn, w, batch, lam, plr, inner_steps)
    # w ← w − lr·λ·(w − θ̂): an SGD step on the "gradient" λ(w − θ̂)
    return loss_fn(w, batch), jax.tree.map(lambda a, t: lam * (a - t), w,
                                           theta)

  return core.local_update_algorithm(
      loss_fn, optax.sgd(lr), local, num_clients=num_clients,
      aggregator=aggs.example_weighted_mean(), server_tx=optax.sgd(beta),
      grad_fn=grad_fn, **kwargs)
