"""FedAST: buffered asynchronous training of several tasks at once.

M tasks (models) share one pool of N clients; R jobs run at any time, R_m of
them for task m (Σ R_m = R). A job of task m downloads x_m, trains locally
and reports after a time drawn from the client's ``SpeedModel`` (times the
task's ``time_scale``). When it reports, its update enters task m's buffer
with the staleness weight s(τ) = (1 + τ)^(−a) (τ: versions of x_m since the
job started; the reference uses a = 0); once the buffer holds b_m updates,

  x_m ← x_m + η_m·(1/b_m)·Σ_buffer s(τ)·Δ,

and task m's version increases. The freed job goes to the task furthest below
its target R_m, on a client drawn uniformly from the idle ones.

Dynamic allocation (``realloc_every``): every so many reported jobs, the
server estimates each task's normalised update variance from its last W
updates, v_m = Σ_j ‖Δ_j − Δ̄‖² / (W·‖Δ̄‖²), and re-divides the R jobs in chunks
of r (``buffer_ratio``): each task keeps at least r, the rest goes chunk by
chunk to the task with the largest ⌊R·v_m/Σv⌋ − (its share so far); buffer
sizes follow as b_m = max(1, ⌈R_m/r⌉). This follows ``askinb/FedAST``
(``server.py``: ``redistributeActiveWorks``, ``calculateUpdVariance``,
``aggregation``) without the reference's per-task learning-rate rescaling of
v_m. With one task and a fixed buffer, FedAST is FedBuff.

FedAST: Federated Asynchronous Simultaneous Training, Askin, Sharma,
Joe-Wong, Joshi, UAI 2024 (arXiv 2406.00302).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from gradax.federated import asynchronous as fasync
from gradax.federated import core


class AstTask(NamedTuple):
  """One task of FedAST: its model's loss, client optimizer, local work,
  data (``ClientData`` over the same N clients), server rate η_m and job-time
  multiplier."""
  loss_fn: Any
  client_tx: optax.GradientTransformation
  local: core.LocalConfig
  data: core.ClientData
  server_lr: float = 1.0
  time_scale: float = 1.0


class AstTrace(NamedTuple):
  """Per reported job: ``clock``, ``task``, ``client``, ``staleness``,
  ``version`` (of that task, after the report); ``targets`` [events, M] the
  allocation R_m in force."""
  clock: np.ndarray
  task: np.ndarray
  client: np.ndarray
  staleness: np.ndarray
  version: np.ndarray
  targets: np.ndarray


class FedAST(NamedTuple):
  """``run(params_per_task, num_events, seed=0, on_update=None)`` returns
  ``(params_per_task, AstTrace)``; ``on_update(task, version, clock,
  params)`` is called after every server update (returning True stops the
  run early)."""
  run: callable


def redistribute(variances, total: int, chunk: int) -> list[int]:
  """FedAST's re-division of ``total`` jobs in chunks of ``chunk``, ∝ v_m."""
  v = np.asarray(variances, np.float64)
  m = v.shape[0]
  new = [chunk] * m
  s = v.sum()
  want = [int(total * vi / s) - chunk if s > 0 else 0 for vi in v]
  left = total - chunk * m
  while left > 0:
    i = int(np.argmax(want))
    give = min(chunk, left)
    new[i] += give
    want[i] -= give
    left -= give
  return new


def fedast(tasks: Sequence[AstTask], speeds: fasync.SpeedModel,
           concurrency: int, active: Sequence[int] | None = None,
           buffer_sizes: Sequence[int] | None = None,
           buffer_ratio: int | None = None, staleness_exponent: float = 0.0,
           realloc_every: int | None = None, variance_window: int = 8
           ) -> FedAST:
  """Builds FedAST on the simulated clock.

  Args:
    tasks: the M ``AstTask``s.
    speeds: per-client ``SpeedModel`` (N clients) of one job's duration.
    concurrency: R, jobs in flight (1 ≤ R ≤ N).
    active: initial R_m (default: R split as evenly as possible).
    buffer_sizes: initial b_m (default ⌈R_m/r⌉).
    buffer_ratio: r = R_m/b_m, the allocation chunk (default: R_0/b_0 of the
      first task if ``buffer_sizes`` is given, else 1).
    staleness_exponent: a ≥ 0 (reference 0).
    realloc_every: re-divide the jobs every so many reports (None: fixed).
    variance_window: W updates per task for the variance estimate.

  Returns:
    ``FedAST`` with ``run``.

  Example:
    >>> tasks = [AstTask(loss_a, optax.sgd(.1), local, data_a),
    ...          AstTask(loss_b, optax.sgd(.1), local, data_b)]
    >>> alg = fedast(tasks, tiered_speeds(100), concurrency=30,
    ...              buffer_ratio=3, realloc_every=40)
    >>> (pa, pb), trace = alg.run([pa0, pb0], num_events=2000)
  """
  tasks = list(tasks)
  m = len(tasks)
  if m < 1:
    raise ValueError("tasks must hold at least one AstTask, got none.")
  n = speeds.num_clients
  r = int(concurrency)
  if not 1 <= r <= n:
    raise ValueError(f"concurrency must lie in [1, {n}], got {concurrency}.")
  if active is None:
    active = [r // m + (i < r % m) for i in range(m)]
  active = [int(v) for v in active]
  if len(active) != m or min(active) < 0 or sum(active) != r:
    raise ValueError(f"active must give one non-negative R_m per task "
                     f"summing to concurrency={r}, got {active}.")
  if buffer_ratio is None:
    buffer_ratio = (max(1, active[0] // int(buffer_sizes[0]))
                    if buffer_sizes is not None else 1)
  ratio = int(buffer_ratio)
  if ratio < 1:
    raise ValueError(f"buffer_ratio must be >= 1, got {buffer_ratio}.")
  if buffer_sizes is None:
    buffer_sizes = [max(1, math.ceil(a / ratio)) for a in active]
  buffer_sizes = [int(b) for b in buffer_sizes]
  if len(buffer_sizes) != m or min(buffer_sizes) < 1:
    raise ValueError(f"buffer_sizes must give one size >= 1 per task, got "
                     f"{buffer_sizes}.")
  if realloc_every is not None and int(realloc_every) < 1:
    raise ValueError(f"realloc_every must be >= 1 or None, got "
                     f"{realloc_every}.")
  if realloc_every is not None and ratio * m > r:
    raise ValueError(f"dynamic allocation keeps buffer_ratio={ratio} jobs per "
                     f"task; concurrency={r} is below {ratio * m}.")
  if int(variance_window) < 2:
    raise ValueError(f"variance_window must be >= 2, got {variance_window}.")
  a = fasync.check_staleness_exponent(staleness_exponent)
  for t in tasks:
    fasync.check_data_matches(t.data, n)
    if not float(t.server_lr) > 0 or not float(t.time_scale) > 0:
      raise ValueError(f"server_lr and time_scale must be > 0, got "
                       f"{t.server_lr} and {t.time_scale}.")
  jobs = [jax.jit(fasync.client_delta_fn(t.loss_fn, t.client_tx, t.local))
          for t in tasks]
  w_size = int(variance_window)

  def run(params_per_task, num_events: int, seed: int = 0, on_update=None):
    if len(params_per_task) != m:
      raise ValueError(f"give one params pytree per task ({m}), got "
                       f"{len(params_per_task)}.")
    rng, key = fasync.host_streams(tasks[0].data, n, seed)
    xs = list(params_per_task)
    version = [0] * m
    buf = [None] * m
    cnt = [0] * m
    target = list(active)
    bsize = list(buffer_sizes)
    running = [0] * m
    window = [[] for _ in range(m)]
    busy = np.zeros(n, bool)
    heap = []
    seq = 0
    log = {k: [] for k in AstTrace._fields}

    def dispatch(task, now):
      nonlocal key, seq
      idle = np.flatnonzero(~busy)
      c = int(rng.choice(idle))
      busy[c] = True
      key, k = jax.random.split(key)
      t = tasks[task]
      delta = jobs[task](xs[task], t.data, c, k, int(t.local.max_work))
      dur = float(speeds.sample_host(rng, [c])[0]) * float(t.time_scale)
      heapq.heappush(heap, (now + dur, seq, task, c, version[task], delta))
      seq += 1
      running[task] += 1

    def variance(ds):
      flat = np.stack([np.concatenate([np.ravel(l) for l in
                                       jax.tree.leaves(d)]) for d in ds])
      mean = flat.mean(0)
      return float(((flat - mean) ** 2).sum() /
                   (len(ds) * max(float(mean @ mean), 1e-30)))

    for task in range(m):
      for _ in range(active[task]):
        dispatch(task, 0.0)

    for e in range(int(num_events)):
      clock, _, task, c, v0, delta = heapq.heappop(heap)
      busy[c] = False
      running[task] -= 1
      tau = version[task] - v0
      sw = fasync.staleness_weight(tau, a)
      u = jax.tree.map(lambda d: sw * d, delta)
      buf[task] = u if buf[task] is None else jax.tree.map(
          lambda p, q: p + q, buf[task], u)
      cnt[task] += 1
      if cnt[task] >= bsize[task]:
        lr = float(tasks[task].server_lr) / cnt[task]
        xs[task] = jax.tree.map(lambda p, q: p + lr * q, xs[task], buf[task])
        version[task] += 1
        buf[task], cnt[task] = None, 0
        if on_update is not None and on_update(task, version[task], clock,
                                               xs[task]):
          break
      window[task] = (window[task] + [delta])[-w_size:]
      if (realloc_every is not None and (e + 1) % int(realloc_every) == 0
          and all(len(w) == w_size for w in window)):
        target = redistribute([variance(w) for w in window], r, ratio)
        bsize = [max(1, math.ceil(t / ratio)) for t in target]
      for k, val in (("clock", clock), ("task", task), ("client", c),
                     ("staleness", tau), ("version", version[task]),
                     ("targets", list(target))):
        log[k].append(val)
      deficit = [target[i] - running[i] for i in range(m)]
      dispatch(int(np.argmax(deficit)), clock)

    return xs, AstTrace(**{k: np.asarray(v) for k, v in log.items()})

  return FedAST(run)
