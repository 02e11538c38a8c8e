"""FedCompass: a computing-power-aware scheduler for semi-asynchronous FL.

The server estimates each client's time per local step,
s_i ← (1 − m)·s_i + m·s_new (``speed_momentum`` m = 0.9: the NEW sample gets
weight m), and gives every dispatched client a number of local steps Q_i so
that the clients of one *arrival group* finish together:

* join an existing group g: Q_i = ⌊(T_g − now)/s_i⌋ where T_g is the group's
  expected arrival time; allowed if Q_min ≤ Q_i ≤ ⌊1.2·Q_max⌋, and among the
  allowed groups the one giving the most steps is taken;
* otherwise create a group: for each open group (now < L_g) the candidate
  Q = ⌊(L_g + s_fast·Q_max − now)/s_i⌋ (s_fast: fastest client of g) if
  Q ≤ Q_max; take the largest candidate, at least Q_min, or Q_max if there is
  none. The new group expects T = now + Q·s_i and closes at the latest time
  L = now + λ·Q·s_i (``latest_time_factor`` λ = 1.5).

A group is aggregated when all its clients arrived or at its latest time L,
whichever comes first: x ← x + Σ_{i∈g} α·s(τ_i)·(1/N)·Δ_i plus the general
buffer (see below), one version per aggregation, with s(τ) = (1 + τ)^(−a).
A client arriving after its group's L is late: its α·s(τ)/N·Δ goes to the
general buffer (applied with the next group) and it is rescheduled at once.
A client's very first arrival (it starts with Q_max steps and no group) is
applied immediately. Clients of an aggregated group are rescheduled fastest
first.

This follows the reference scheduler (``APPFL`` ``SchedulerCompass``,
``ServerFedCompass``) with two documented choices: the staleness factor uses
the decreasing FedAsync form (τ + 1)^(−a) (the reference yaml writes
(u + 1)^a with a = 0.5, which would up-weight stale updates), and the
client learning-rate decay of the reference (0.995 per Q_max steps) is left
to the client optimizer (pass an optax schedule).

FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client
Devices Using a Computing Power Aware Scheduler, Li et al., ICLR 2024
(arXiv 2309.14675).
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import jax
import numpy as np
import optax

from gradax.federated import asynchronous as fasync
from gradax.federated import core


class CompassTrace(NamedTuple):
  """What happened, as numpy arrays.

  Per arrival: ``arrival_time``, ``client``, ``group`` (−1: first arrival,
  applied alone), ``expected_time`` (the group's T when the client was
  assigned; NaN for −1), ``local_steps`` Q_i, ``staleness`` τ, ``late``.
  Per server version: ``update_time``, ``update_size`` (arrivals applied).
  """
  arrival_time: np.ndarray
  client: np.ndarray
  group: np.ndarray
  expected_time: np.ndarray
  local_steps: np.ndarray
  staleness: np.ndarray
  late: np.ndarray
  update_time: np.ndarray
  update_size: np.ndarray


class FedCompass(NamedTuple):
  """``run(params, data, num_updates, seed=0, on_update=None)``.

  Runs the event loop until ``num_updates`` server versions exist and
  returns ``(params, CompassTrace)``; ``on_update(version, clock, params)``
  is called after every version (e.g. to evaluate against the clock) and
  stops the run early by returning True.
  """
  run: callable


def fedcompass(loss_fn, client_tx: optax.GradientTransformation,
               local: core.LocalConfig, speeds: fasync.SpeedModel,
               max_local_steps: int = 100, min_local_steps: int | None = None,
               latest_time_factor: float = 1.5, speed_momentum: float = 0.9,
               server_lr: float = 0.9, staleness_exponent: float = 0.5
               ) -> FedCompass:
  """Builds FedCompass on the simulated clock.

  A client's job of Q local steps takes Q·d seconds, with d (seconds per
  step) drawn from its ``SpeedModel`` once per job.

  Args:
    loss_fn: masked-mean loss.
    client_tx: local optimizer (reference: Adam 1e-3).
    local: ``LocalConfig`` with ``unit="steps"`` (its ``max_work`` is ignored:
      the scheduler sets the steps).
    speeds: per-client ``SpeedModel`` of the time per local step (N clients).
    max_local_steps: Q_max (reference 100).
    min_local_steps: Q_min (default ⌊0.2·Q_max⌋, at least 1).
    latest_time_factor: λ > 1 (reference 1.5).
    speed_momentum: m in (0, 1] (reference 0.9).
    server_lr: α > 0 (reference 0.9).
    staleness_exponent: a ≥ 0 in s(τ) = (1 + τ)^(−a).

  Returns:
    ``FedCompass`` with ``run``.

  Example:
    >>> alg = fedcompass(loss, optax.sgd(0.05), LocalConfig(16), speeds, 20)
    >>> params, trace = alg.run(params0, data, num_updates=50)
  """
  if local.unit != "steps":
    raise ValueError(f"FedCompass assigns local steps; local.unit must be "
                     f"'steps', got {local.unit!r}.")
  q_max = int(max_local_steps)
  if q_max < 1:
    raise ValueError(f"max_local_steps must be >= 1, got {max_local_steps}.")
  q_min = (max(math.floor(0.2 * q_max), 1) if min_local_steps is None
           else int(min_local_steps))
  if not 1 <= q_min <= q_max:
    raise ValueError(f"min_local_steps must lie in [1, max_local_steps="
                     f"{q_max}], got {min_local_steps}.")
  q_bound = math.floor(1.2 * q_max)
  if not float(latest_time_factor) > 1:
    raise ValueError(f"latest_time_factor must be > 1, got "
                     f"{latest_time_factor}.")
  if not 0 < float(speed_momentum) <= 1:
    raise ValueError(f"speed_momentum must lie in (0, 1], got "
                     f"{speed_momentum}.")
  if not float(server_lr) > 0:
    raise ValueError(f"server_lr must be > 0, got {server_lr}.")
  a = fasync.check_staleness_exponent(staleness_exponent)
  lam, mom, alpha = float(latest_time_factor), float(speed_momentum), \
      float(server_lr)
  n = speeds.num_clients
  job = jax.jit(fasync.client_delta_fn(loss_fn, client_tx, local,
                                       max_steps=q_bound))

  def run(params, data: core.ClientData, num_updates: int, seed: int = 0,
          on_update=None):
    rng, key = fasync.host_streams(data, n, seed)
    x = params
    version = 0
    clock = 0.0
    seq = 0
    events = []   # (time, seq, kind, payload)
    speed = np.full(n, np.nan)          # estimated seconds per step
    info = [dict() for _ in range(n)]   # group, steps, start, version, delta
    groups = {}                         # id -> dict
    next_group = 0
    general = None                      # late clients' weighted deltas
    general_count = 0
    log = {k: [] for k in CompassTrace._fields}
    stop = [False]

    def push(t, kind, payload):
      nonlocal seq
      heapq.heappush(events, (t, seq, kind, payload))
      seq += 1

    def dispatch(cid, steps, group, now):
      nonlocal key
      key, k = jax.random.split(key)
      d = float(speeds.sample_host(rng, [cid])[0])
      inf = info[cid]
      inf.update(group=group, steps=steps, start=now, version=version,
                 delta=job(x, data, cid, k, steps),
                 expected=(groups[group]["expected"] if group >= 0
                           else np.nan))
      push(now + steps * d, "arrive", cid)

    def new_group(cid, steps, now):
      nonlocal next_group
      g = next_group
      next_group += 1
      groups[g] = {"clients": {cid}, "arrived": [],
                   "expected": now + steps * speed[cid],
                   "latest": now + lam * steps * speed[cid], "buffer": None}
      push(groups[g]["latest"], "deadline", g)
      return g

    def assign(cid, now):
      """Joins or creates an arrival group; returns (group, steps)."""
      best_g, best_q = -1, -1
      for g, gr in groups.items():
        q = math.floor((gr["expected"] - now) / speed[cid])
        if q < q_min or q < best_q or q > q_bound:
          continue
        best_g, best_q = g, q
      if best_g >= 0:
        groups[best_g]["clients"].add(cid)
        return best_g, best_q
      q_new = -1
      for gr in groups.values():
        if now < gr["latest"]:
          members = list(gr["clients"]) + gr["arrived"]
          fastest = min(speed[c] for c in members)
          q = math.floor((gr["latest"] + fastest * q_max - now) / speed[cid])
          if q <= q_max:
            q_new = max(q_new, q)
      if 0 <= q_new < q_min:
        q_new = q_min
      if q_new < 0:
        q_new = q_max
      return new_group(cid, q_new, now), q_new

    def weighted(cid):
      tau = version - info[cid]["version"]
      w = alpha * fasync.staleness_weight(tau, a) / n
      return jax.tree.map(lambda d: w * d, info[cid]["delta"]), tau

    def add(buf, u):
      if buf is None or u is None:
        return u if buf is None else buf
      return jax.tree.map(lambda p, q: p + q, buf, u)

    def apply(u, size, now):
      nonlocal x, version
      x = jax.tree.map(lambda p, q: p + q, x, u)
      version += 1
      log["update_time"].append(now)
      log["update_size"].append(size)
      if on_update is not None and on_update(version, now, x):
        stop[0] = True

    def aggregate(g, now):
      nonlocal general, general_count
      gr = groups[g]
      if gr["buffer"] is not None:
        apply(add(gr["buffer"], general), len(gr["arrived"]) + general_count,
              now)
        general, general_count = None, 0
      arrived = sorted(gr["arrived"], key=lambda c: speed[c])
      gr["arrived"], gr["buffer"] = [], None
      gr["expected"] = gr["latest"] = 0.0
      if not gr["clients"]:
        del groups[g]
      for c in arrived:          # fastest first, each sees the new model
        grp, q = assign(c, now)
        dispatch(c, q, grp, now)

    for c in range(n):           # everyone starts with Q_max, no group
      dispatch(c, q_max, -1, 0.0)

    while version < int(num_updates) and events and not stop[0]:
      clock, _, kind, payload = heapq.heappop(events)
      if kind == "deadline":
        if payload in groups and groups[payload]["latest"] > 0:
          aggregate(payload, clock)
        continue
      cid = payload
      inf = info[cid]
      s_new = (clock - inf["start"]) / inf["steps"]
      speed[cid] = (s_new if np.isnan(speed[cid])
                    else (1 - mom) * speed[cid] + mom * s_new)
      u, tau = weighted(cid)
      g = inf["group"]
      late = g >= 0 and clock >= groups[g]["latest"]
      for k, v in (("arrival_time", clock), ("client", cid), ("group", g),
                   ("expected_time", inf["expected"]),
                   ("local_steps", inf["steps"]), ("staleness", tau),
                   ("late", late)):
        log[k].append(v)
      if g < 0:                  # first arrival: applied on its own
        apply(u, 1, clock)
      elif late:
        gr = groups[g]
        gr["clients"].discard(cid)
        if not gr["clients"] and not gr["arrived"]:
          del groups[g]
        general = add(general, u)
        general_count += 1
      else:
        gr = groups[g]
        gr["clients"].discard(cid)
        gr["arrived"].append(cid)
        gr["buffer"] = add(gr["buffer"], u)
        if not gr["clients"]:
          aggregate(g, clock)
        continue
      grp, q = assign(cid, clock)
      dispatch(cid, q, grp, clock)

    trace = CompassTrace(**{k: np.asarray(v) for k, v in log.items()})
    return x, trace

  return FedCompass(run)
