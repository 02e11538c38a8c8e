"""Straggler simulation: a per-worker clock, backup workers and gradient coding.

Every SPMD collective is a barrier, so real asynchrony cannot happen inside
one jitted program (ALGORITHMS.md §3.10). gradax therefore *simulates* the
effect of stragglers: a seeded :class:`TimeModel` draws each worker's step
time, a policy turns finish times into participation weights, the weighted
mean ``psum(w·g)/psum(w)`` runs with every device still in the collective
(:func:`weighted_pmean`), and a simulated clock advances by the time the
policy waited. Time-to-target figures are in simulated seconds.

Policies:

* fastest n − b (static backup workers; Chen et al. 2016, "Revisiting
  Distributed Synchronous SGD", arXiv 1604.00981);
* :class:`DynamicBackupWorkers` (Xu, Neglia, Sebastianelli, "Dynamic Backup
  Workers for Parallel Machine Learning", 2020, arXiv 2004.14696);
* :class:`GradientCode`, cyclic gradient coding (Tandon et al., "Gradient
  Coding", ICML 2017, arXiv 1612.03301): the exact sum decodes from any
  n − s workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DISTRIBUTIONS = ("constant", "shifted_exponential", "lognormal")


@dataclasses.dataclass(frozen=True)
class TimeModel:
  """Seeded per-worker step times.

  time_i(t) = speed_i · (base + X), with X ~ Exp(mean=scale)
  (``"shifted_exponential"``), X = base·(LogNormal(0, sigma) − 1)
  (``"lognormal"``) or 0 (``"constant"``); with probability ``slow_prob`` a
  worker is additionally ``slow_factor`` times slower that step.

  Attributes:
    num_workers: n >= 1.
    distribution: one of ``constant``, ``shifted_exponential``, ``lognormal``.
    base: minimum (deterministic) compute time per step, > 0.
    scale: mean of the exponential tail (shifted exponential), >= 0.
    sigma: log-std of the lognormal, >= 0.
    slow_prob: probability in [0, 1] of a transient slowdown.
    slow_factor: slowdown multiplier >= 1.
    speeds: optional per-worker multipliers (persistent heterogeneity).
    seed: PRNG seed; ``sample(t)`` depends only on (seed, t).

  Example:
    >>> tm = TimeModel(8, "shifted_exponential", base=1.0, scale=0.5, seed=0)
    >>> times = tm.sample(step=3)          # (8,) seconds
  """
  num_workers: int
  distribution: str = "shifted_exponential"
  base: float = 1.0
  scale: float = 0.5
  sigma: float = 0.5
  slow_prob: float = 0.0
  slow_factor: float = 5.0
  speeds: tuple[float, ...] | None = None
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.num_workers, int) or self.num_workers < 1:
      raise ValueError(
          f"num_workers={self.num_workers!r}; must be an integer >= 1.")
    if self.distribution not in DISTRIBUTIONS:
      raise ValueError(
          f"distribution={self.distribution!r}; allowed: "
          f"{', '.join(DISTRIBUTIONS)}.")
    if not self.base > 0:
      raise ValueError(f"base={self.base!r}; must be > 0 seconds.")
    if self.scale < 0 or self.sigma < 0:
      raise ValueError(
          f"scale={self.scale!r}, sigma={self.sigma!r}; both must be >= 0.")
    if not 0.0 <= self.slow_prob <= 1.0:
      raise ValueError(f"slow_prob={self.slow_prob!r}; must be in [0, 1].")
    if self.slow_factor < 1:
      raise ValueError(f"slow_factor={self.slow_factor!r}; must be >= 1.")
    if self.speeds is not None and len(self.speeds) != self.num_workers:
      raise ValueError(
          f"speeds has {len(self.speeds)} entries; expected num_workers="
          f"{self.num_workers}.")

  def sample(self, step: int) -> np.ndarray:
    """Step times (seconds) of all workers at ``step``; shape (n,)."""
    rng = np.random.default_rng([self.seed, int(step)])
    n = self.num_workers
    if self.distribution == "constant":
      t = np.full(n, self.base)
    elif self.distribution == "shifted_exponential":
      t = self.base + rng.exponential(self.scale, n) if self.scale > 0 else (
          np.full(n, self.base))
    else:
      t = self.base * rng.lognormal(0.0, self.sigma, n)
    slow = rng.random(n) < self.slow_prob
    t = np.where(slow, t * self.slow_factor, t)
    if self.speeds is not None:
      t = t * np.asarray(self.speeds, np.float64)
    return t


def fastest(times: np.ndarray, k: int) -> tuple[np.ndarray, float]:
  """Waits for the ``k`` fastest workers (n − k backup workers).

  Args:
    times: (n,) finish times.
    k: workers waited for, 1 <= k <= n.

  Returns:
    ``(weights, wait)``: 0/1 weights (n,) and the k-th smallest time.
  """
  times = np.asarray(times)
  n = times.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"k={k!r}; must be in [1, {n}] (the number of workers).")
  order = np.argsort(times, kind="stable")
  w = np.zeros(n, np.float32)
  w[order[:k]] = 1.0
  return w, float(times[order[k - 1]])


def weighted_pmean(tree: Any, weight: jax.Array, axis_name: str) -> Any:
  """``psum(w·x)/psum(w)`` over ``axis_name`` (inside ``shard_map``).

  Every device stays in the collective; a straggler simply contributes
  weight 0. Both sums travel in one all-reduce.
  """
  weight = jnp.asarray(weight, jnp.float32)
  num, den = lax.psum(
      (jax.tree.map(lambda x: weight * x.astype(jnp.float32), tree), weight),
      axis_name)
  return jax.tree.map(lambda s, x: (s / den).astype(x.dtype), num, tree)


def weighted_psum(tree: Any, weight: jax.Array, axis_name: str) -> Any:
  """``psum(w·x)`` over ``axis_name``: decodes gradient codes in-network."""
  weight = jnp.asarray(weight, jnp.float32)
  return lax.psum(jax.tree.map(lambda x: weight * x, tree), axis_name)


class DynamicBackupWorkers:
  """DBW: choose how many workers to wait for, every iteration.

  The server picks k (and so b = n − k backup workers) maximising the
  expected loss decrease per unit of wall-clock time,

      k* = argmax_k  ΔL(k) / E[T_(k)],
      ΔL(k) = η‖∇F‖² − (Lη²/2)·(‖∇F‖² + σ²/k),

  with E[T_(k)] the k-th order statistic of step times averaged over a window
  of past iterations, σ² the per-worker gradient variance and ‖∇F‖² the
  squared full-gradient norm, estimated from the received gradients
  (‖ḡ‖² − σ²/k), and L the smoothness, estimated from successive
  mean gradients by a secant ratio with their noise (σ²/k_t + σ²/k_{t−1})
  removed; all smoothed by an EMA. Late workers'
  finish times are known to the server when they arrive, so the time window
  holds complete samples.

  Paper: Xu, Neglia, Sebastianelli, "Dynamic Backup Workers for Parallel
  Machine Learning", 2020, arXiv 2004.14696 (the estimator details here are
  gradax's; see ALGORITHMS.md §3.10).

  Args:
    num_workers: n.
    learning_rate: η of the SGD step the server takes.
    window: past iterations used for E[T_(k)].
    ema: smoothing of the gradient statistics in [0, 1).
    smoothness: a fixed L, or None to estimate it.

  Example:
    >>> dbw = DynamicBackupWorkers(16, learning_rate=0.1)
    >>> k = dbw.choose(); ... ; dbw.observe(times, grads_received, params)
  """

  def __init__(self, num_workers: int, learning_rate: float, window: int = 20,
               ema: float = 0.8, smoothness: float | None = None):
    if num_workers < 2:
      raise ValueError(f"num_workers={num_workers!r}; DBW needs >= 2.")
    if not learning_rate > 0:
      raise ValueError(f"learning_rate={learning_rate!r}; must be > 0.")
    if not 0 <= ema < 1:
      raise ValueError(f"ema={ema!r}; must be in [0, 1).")
    self.n = num_workers
    self.lr = learning_rate
    self.window = window
    self.ema = ema
    self.fixed_L = smoothness
    self.times: list[np.ndarray] = []
    self.grad_sq = None
    self.var = None
    self.L = smoothness
    self._prev = None

  def expected_wait(self) -> np.ndarray:
    """E[T_(k)] for k = 1..n from the window (ones before any sample)."""
    if not self.times:
      return np.arange(1, self.n + 1, dtype=np.float64)
    return np.mean(np.sort(np.stack(self.times[-self.window:]), axis=1),
                   axis=0)

  def choose(self) -> int:
    """Workers to wait for at this iteration."""
    if self.grad_sq is None or self.var is None or self.L is None or (
        len(self.times) < 2):
      # Warm-up: half the workers (>= 2) give a first variance estimate
      # without paying for the slowest ones.
      return max(2, self.n // 2)
    k = np.arange(1, self.n + 1)
    gain = self.lr * self.grad_sq - 0.5 * self.L * self.lr ** 2 * (
        self.grad_sq + self.var / k)
    rate = gain / self.expected_wait()
    if np.all(gain <= 0):
      return self.n
    return int(k[np.argmax(rate)])

  def observe(self, times: np.ndarray, grads: np.ndarray,
              params: np.ndarray) -> None:
    """Records an iteration: all finish times, the k received gradients
    (k, d) and the parameters they were computed at."""
    self.times.append(np.asarray(times, np.float64))
    g = np.asarray(grads, np.float64)
    k = g.shape[0]
    mean = g.mean(axis=0)
    if k >= 2:
      var = float(np.sum((g - mean) ** 2) / (k - 1))
      self.var = var if self.var is None else (
          self.ema * self.var + (1 - self.ema) * var)
    if self.var is not None:
      gsq = max(float(mean @ mean) - self.var / k, 0.0)
      self.grad_sq = gsq if self.grad_sq is None else (
          self.ema * self.grad_sq + (1 - self.ema) * gsq)
    p = np.asarray(params, np.float64)
    if self.fixed_L is None and self._prev is not None and self.var:
      # E|g_t - g_{t-1}|^2 = |grad F_t - grad F_{t-1}|^2 + var/k_t + var/k_{t-1}
      step_sq = float(np.sum((p - self._prev[0]) ** 2))
      if step_sq > 0:
        diff_sq = float(np.sum((mean - self._prev[1]) ** 2))
        signal = max(diff_sq - self.var / k - self.var / self._prev[2], 0.0)
        est = np.sqrt(signal / step_sq)
        self.L = est if self.L is None else (
            self.ema * self.L + (1 - self.ema) * est)
    self._prev = (p, mean, k)


class GradientCode:
  """Cyclic gradient code: the exact gradient sum from any n − s workers.

  Data is split into n partitions with gradients g_1..g_n. Worker i computes
  c_i = Σ_j B_ij g_j over the s + 1 partitions {i, …, i+s} (mod n). B's rows
  lie in the null space of a random s×n matrix H with H·1 = 0, so any n − s
  rows span null(H) ∋ 1 and weights a with Σ_{i alive} a_i B_i = 1ᵀ exist:
  Σ_i a_i c_i = Σ_j g_j exactly (to float rounding).

  Paper: Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding
  Stragglers in Distributed Learning", ICML 2017, arXiv 1612.03301
  (Algorithm 2, cyclic repetition scheme).

  Args:
    num_workers: n >= 1.
    num_stragglers: s, 0 <= s < n.
    seed: seed of H.

  Example:
    >>> code = GradientCode(8, 2)
    >>> a = code.decode_weights(alive)       # (n,), zero for dead workers
    >>> total = weighted_psum(c_i, a[i], "data")
  """

  def __init__(self, num_workers: int, num_stragglers: int, seed: int = 0):
    n, s = num_workers, num_stragglers
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"num_workers={n!r}; must be an integer >= 1.")
    if not isinstance(s, int) or not 0 <= s < n:
      raise ValueError(
          f"num_stragglers={s!r}; must be an integer in [0, {n - 1}] "
          f"(fewer than the {n} workers).")
    self.n, self.s = n, s
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(s, n))
    if s:
      h[:, -1] = -h[:, :-1].sum(axis=1)
    b = np.zeros((n, n))
    for i in range(n):
      b[i, i] = 1.0
      if s:
        supp = [(i + j) % n for j in range(1, s + 1)]
        b[i, supp] = np.linalg.solve(h[:, supp], -h[:, i])
    self.B = b

  def support(self, worker: int) -> list[int]:
    """Partitions worker ``worker`` computes gradients on."""
    return [(worker + j) % self.n for j in range(self.s + 1)]

  def encode(self, partition_grads: np.ndarray) -> np.ndarray:
    """Every worker's coded message from (n, d) partition gradients."""
    return self.B @ np.asarray(partition_grads)

  def decode_weights(self, alive: np.ndarray) -> np.ndarray:
    """Decoding weights a (n,), zero for dead workers, with aᵀB = 1ᵀ.

    Raises:
      ValueError: if more than s workers are missing.
    """
    alive = np.asarray(alive, bool)
    if alive.shape != (self.n,):
      raise ValueError(f"alive has shape {alive.shape}; expected ({self.n},).")
    missing = int(self.n - alive.sum())
    if missing > self.s:
      raise ValueError(
          f"{missing} workers are missing but the code tolerates only "
          f"num_stragglers={self.s}.")
    rows = self.B[alive]
    a_alive, *_ = np.linalg.lstsq(rows.T, np.ones(self.n), rcond=None)
    a = np.zeros(self.n)
    a[alive] = a_alive
    return a.astype(np.float32)


def time_to_target(losses: np.ndarray, clock: np.ndarray,
                   target: float) -> float:
  """First simulated time at which ``losses`` reaches ``target`` (inf if never)."""
  losses, clock = np.asarray(losses), np.asarray(clock)
  hit = np.nonzero(losses <= target)[0]
  return float(clock[hit[0]]) if hit.size else float("inf")
