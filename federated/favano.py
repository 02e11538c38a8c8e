"""FAVANO: federated averaging with asynchronous nodes.

Clients never wait for the server: client i keeps taking local steps from the
last global model it received, a_i, at its own speed (each step takes a time
drawn from its ``SpeedModel``), up to K steps, then idles. The server acts at
regular times t·P (P = ``period``): it draws a uniform subset S_t of s
clients, each of which sends its current progress q_i − a_i after the e_i
steps it completed since it last synchronised, and

  x_{t+1} = x_t + η·(1/s)·Σ_{i∈S_t} c_i·(q_i − a_i),

then the clients of S_t restart from x_{t+1}; the others keep computing on
their old anchors. Clients that completed no step contribute 0.

Reweighting c_i (the paper's correction of the bias towards fast clients,
which otherwise contribute more steps per server step): with
``reweight=True`` the progress is normalised to a full round of work,
c_i = K/e_i (for e_i ≥ 1), so a slow client's partial progress counts as much
as a fast client's K steps; ``reweight=False`` uses c_i = 1. With equal speeds
such that every client completes its K steps within P, and s = N, both reduce
to FedAvg with K local steps (equal weights).

Unverified against the paper: of arXiv 2305.16099 only the abstract and the
opening of the introduction could be read here (the stored ar5iv page), not
its Algorithm 1, so neither the server step above nor the form of the
reweighting (inverse completed-work normalisation K/e_i) is checked against
the paper's lines; treat both as the documented gradax rule, which the tests
check against a plain reference of the formula above.

FAVANO: Federated AVeraging with Asynchronous NOdes, Leconte, Nguyen,
Moulines, ICASSP 2024 (arXiv 2305.16099).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradax.federated import asynchronous as fasync
from gradax.federated import core


class FavanoTrace(NamedTuple):
  """Per server step: ``clock``, ``selected`` [s] client ids, ``steps`` [s]
  the e_i they had completed, ``staleness`` [s] server steps since their
  anchor."""
  clock: np.ndarray
  selected: np.ndarray
  steps: np.ndarray
  staleness: np.ndarray


class Favano(NamedTuple):
  """``run(params, data, num_steps, seed=0, on_update=None)`` runs
  ``num_steps`` server steps and returns ``(params, FavanoTrace)``;
  ``on_update(step, clock, params)`` is called after each one (returning
  True stops the run early)."""
  run: callable


def favano(loss_fn, client_tx: optax.GradientTransformation,
           local: core.LocalConfig, speeds: fasync.SpeedModel, period: float,
           clients_per_step: int | None = None, server_lr: float = 1.0,
           reweight: bool = True) -> Favano:
  """Builds FAVANO on the simulated clock.

  Args:
    loss_fn: masked-mean loss.
    client_tx: local optimizer (re-initialised at each synchronisation).
    local: ``LocalConfig`` with ``unit="steps"``; ``max_work`` is K, the cap
      on local steps between two synchronisations.
    speeds: per-client ``SpeedModel`` of the time of ONE local step.
    period: P > 0, simulated seconds between server steps.
    clients_per_step: s in [1, N] (default N).
    server_lr: η > 0.
    reweight: c_i = K/e_i (True) or 1 (False).

  Returns:
    ``Favano`` with ``run``.

  Example:
    >>> alg = favano(loss, optax.sgd(0.05), LocalConfig(16, "steps", 5),
    ...              tiered_speeds(100, means=(1., .5, .2)), period=2.0,
    ...              clients_per_step=20)
    >>> params, trace = alg.run(params0, data, num_steps=100)
  """
  if local.unit != "steps":
    raise ValueError(f"FAVANO counts local steps; local.unit must be "
                     f"'steps', got {local.unit!r}.")
  n = speeds.num_clients
  s = n if clients_per_step is None else int(clients_per_step)
  if not 1 <= s <= n:
    raise ValueError(f"clients_per_step must lie in [1, {n}], got "
                     f"{clients_per_step}.")
  if not float(period) > 0:
    raise ValueError(f"period must be > 0, got {period}.")
  if not float(server_lr) > 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr}.")
  k_max = int(local.max_work)
  job = fasync.client_delta_fn(loss_fn, client_tx, local)

  @jax.jit
  def server_step(x, anchors, data, ids, keys, steps):
    deltas = jax.vmap(job, (0, None, 0, 0, 0))(
        jax.tree.map(lambda a: a[ids], anchors), data, ids, keys, steps)
    e = steps.astype(jnp.float32)
    c = (jnp.where(e > 0, k_max / jnp.maximum(e, 1.0), 0.0) if reweight
         else (e > 0).astype(jnp.float32))
    agg = jax.tree.map(
        lambda d: jnp.tensordot(c, d, axes=1) * (server_lr / s), deltas)
    x = jax.tree.map(jnp.add, x, agg)
    anchors = jax.tree.map(lambda a, p: a.at[ids].set(p), anchors,
                           jax.tree.map(lambda p: jnp.broadcast_to(
                               p, (ids.shape[0],) + p.shape), x))
    return x, anchors

  def run(params, data: core.ClientData, num_steps: int, seed: int = 0,
          on_update=None):
    rng, key = fasync.host_streams(data, n, seed)
    x = params
    anchors = jax.tree.map(lambda p: jnp.broadcast_to(p, (n,) + p.shape), x)
    # finish time of each of the K steps of every client's current job
    start = np.zeros(n)
    step_times = np.cumsum(
        speeds.sample_host(rng, np.repeat(np.arange(n), k_max)).reshape(
            n, k_max), axis=1)
    anchor_step = np.zeros(n, np.int64)
    log = {k: [] for k in FavanoTrace._fields}
    for t in range(1, int(num_steps) + 1):
      clock = t * float(period)
      ids = np.sort(rng.choice(n, s, replace=False))
      steps = np.sum(start[ids, None] + step_times[ids] <= clock, axis=1)
      key, sub = jax.random.split(key)
      keys = jax.random.split(sub, s)
      for k, v in (("clock", clock), ("selected", ids), ("steps", steps),
                   ("staleness", t - 1 - anchor_step[ids])):
        log[k].append(v)
      x, anchors = server_step(x, anchors, data, jnp.asarray(ids, jnp.int32),
                               keys, jnp.asarray(steps, jnp.int32))
      start[ids] = clock
      anchor_step[ids] = t
      step_times[ids] = np.cumsum(speeds.sample_host(
          rng, np.repeat(ids, k_max)).reshape(s, k_max), axis=1)
      if on_update is not None and on_update(t, clock, x):
        break
    return x, FavanoTrace(**{k: np.asarray(v) for k, v in log.items()})

  return Favano(run)
