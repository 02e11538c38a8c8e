"""Byzantine-robust aggregators of stacked worker vectors.

Each aggregator is a callable ``agg(stacked) -> aggregate`` mapping the
``(n, d)`` matrix of worker gradients to ``(d,)``; ``num_faulty`` f is the
number of Byzantine workers it must tolerate, validated against n when it is
called (trace time). Use one as the ``reducer`` of
:func:`gradax.distributed.data_parallel` (gradients are all-gathered, the
aggregate is computed redundantly on every device, ALGORITHMS.md §3.11).

Tolerance (what theory allows):

* coordinate median (Yin et al. 2018, arXiv 1803.01498): n > 2f;
* trimmed mean of the middle n - 2f values per coordinate (same paper): n > 2f;
* Krum (Blanchard et al. 2017, "Machine Learning with Adversaries"): n > 2f + 2;
* Flag aggregator (Almasi et al. 2023, arXiv 2302.05865): n > 2f.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


def _check_f(num_faulty) -> int:
  if (isinstance(num_faulty, bool) or not isinstance(num_faulty, int)
      or num_faulty < 0):
    raise ValueError(
        f"num_faulty={num_faulty!r}; must be an integer >= 0.")
  return num_faulty


@dataclasses.dataclass(frozen=True)
class Aggregator:
  """A robust aggregation rule.

  Attributes:
    name: short name.
    num_faulty: f, Byzantine workers tolerated.
    min_workers: ``min_workers(f)``, the smallest n the rule allows.
    fn: ``fn(stacked (n, d)) -> (d,)``.
  """
  name: str
  num_faulty: int
  min_workers: Callable[[int], int]
  fn: Callable[[jax.Array], jax.Array]

  @property
  def __name__(self):  # used as the reducer's name
    return self.name

  def __call__(self, stacked: jax.Array) -> jax.Array:
    n = stacked.shape[0]
    need = self.min_workers(self.num_faulty)
    if n < need:
      raise ValueError(
          f"{self.name} with num_faulty={self.num_faulty} needs at least "
          f"{need} workers, got {n}; tolerate fewer faulty workers or add "
          "workers.")
    return self.fn(stacked.astype(jnp.float32))


def coordinate_median(num_faulty: int = 0) -> Aggregator:
  """Coordinate-wise median: agg_j = median_i x_ij (needs n > 2f).

  Paper: Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", 2018, arXiv 1803.01498.

  Args:
    num_faulty: f; only validated (the median tolerates any f < n/2).

  Returns:
    An :class:`Aggregator`.

  Example:
    >>> agg = coordinate_median(1)
    >>> agg(jnp.stack([g1, g2, bad]))
  """
  f = _check_f(num_faulty)
  return Aggregator("coordinate_median", f, lambda f: 2 * f + 1,
                    lambda x: jnp.median(x, axis=0))


def trimmed_mean(num_faulty: int) -> Aggregator:
  """Coordinate-wise trimmed mean: drop the f largest and f smallest values.

  agg_j = (1/(n-2f)) Σ_{i=f}^{n-f-1} x_(i)j, with x_(i)j the sorted values
  of coordinate j (needs n > 2f).

  Paper: Yin et al., 2018, arXiv 1803.01498.

  Args:
    num_faulty: f >= 0, values trimmed at each end.

  Returns:
    An :class:`Aggregator`.

  Example:
    >>> trimmed_mean(1)(jnp.stack([g1, g2, g3, bad]))
  """
  f = _check_f(num_faulty)

  def fn(x):
    n = x.shape[0]
    return jnp.mean(jnp.sort(x, axis=0)[f:n - f], axis=0)

  return Aggregator("trimmed_mean", f, lambda f: 2 * f + 1, fn)


def krum(num_faulty: int, num_selected: int = 1) -> Aggregator:
  """Krum / Multi-Krum: average the m workers with the lowest Krum score.

  score(i) = Σ_{j ∈ N_i} ‖x_i − x_j‖², N_i = the n − f − 2 nearest other
  workers; with m = 1 the aggregate is the best-scoring worker itself
  (needs n > 2f + 2).

  Paper: Blanchard et al., "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017.

  Args:
    num_faulty: f >= 0.
    num_selected: m >= 1, workers averaged (Multi-Krum for m > 1); at most
      n - f.

  Returns:
    An :class:`Aggregator`.

  Example:
    >>> krum(1)(jnp.stack([g1, g2, g3, g4, bad]))
  """
  f = _check_f(num_faulty)
  if isinstance(num_selected, bool) or not isinstance(num_selected, int) or (
      num_selected < 1):
    raise ValueError(f"num_selected={num_selected!r}; must be an integer >= 1.")

  def fn(x):
    n = x.shape[0]
    if num_selected > n - f:
      raise ValueError(
          f"krum: num_selected={num_selected} exceeds n - f = {n - f}.")
    sq = jnp.sum(x * x, axis=1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    d2 = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d2)
    nearest = jnp.sort(d2, axis=1)[:, :n - f - 2]
    scores = jnp.sum(nearest, axis=1)
    best = jnp.argsort(scores)[:num_selected]
    return jnp.mean(x[best], axis=0)

  return Aggregator("krum", f, lambda f: 2 * f + 3, fn)


def flag_aggregator(num_faulty: int = 0, rank: int = 1, iterations: int = 4,
                    eps: float = 1e-7) -> Aggregator:
  """Flag aggregator: a flag-median subspace of the gradients, by IRLS.

  Each worker's gradient is normalised, x_i = g_i/‖g_i‖. Starting from the
  flag mean (top-r left singular vectors of X = [x_1 … x_n]), IRLS repeats

      w_i = (1 − ‖Yᵀx_i‖² + eps)^(−1/4),   Y ← top-r left singular vectors of
      [w_1 x_1 … w_n x_n],

  which minimises Σ_i sin θ_i (the flag median: each worker's principal
  angle to the subspace counts once, so one far-off worker cannot pull Y).
  The aggregate is read in the subspace robustly: Y · median_i(Yᵀ g_i)
  (coordinate-wise over the r directions). The reference
  (``hamidralmasi/FlagAggregator``) instead returns Σ_i Y Yᵀ x_i / r, which
  discards gradient magnitudes; gradax keeps them. Singular vectors come from
  the n×n Gram matrix, so the cost is O(n²d) per iteration.

  Paper: Almasi et al., "Flag Aggregator: Scalable Distributed Training under
  Failures and Augmented Losses using Convex Optimization", 2023,
  arXiv 2302.05865.

  Args:
    num_faulty: f; needs n > 2f.
    rank: r >= 1, subspace dimension (at most n).
    iterations: IRLS iterations >= 1 (the reference uses 4).
    eps: weight regulariser > 0.

  Returns:
    An :class:`Aggregator`.

  Example:
    >>> flag_aggregator(1)(jnp.stack([g1, g2, g3, bad]))
  """
  f = _check_f(num_faulty)
  for name, v in (("rank", rank), ("iterations", iterations)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{name}={v!r}; must be an integer >= 1.")
  if not eps > 0:
    raise ValueError(f"eps={eps!r}; must be > 0.")

  def top_left(a):
    # Top-r left singular vectors of a (d x n) via the n x n Gram matrix.
    evals, evecs = jnp.linalg.eigh(a.T @ a)
    evals, evecs = evals[::-1][:rank], evecs[:, ::-1][:, :rank]
    y = a @ evecs / jnp.sqrt(jnp.maximum(evals, 1e-30))
    q, _ = jnp.linalg.qr(y)
    return q

  def fn(g):
    n = g.shape[0]
    if rank > n:
      raise ValueError(f"flag_aggregator: rank={rank} exceeds n={n} workers.")
    norms = jnp.linalg.norm(g, axis=1, keepdims=True)
    x = (g / jnp.maximum(norms, 1e-30)).T                     # (d, n)
    y = top_left(x)
    for _ in range(iterations):
      cos2 = jnp.sum((y.T @ x) ** 2, axis=0)
      w = (jnp.maximum(1.0 - cos2, 0.0) + eps) ** -0.25
      y = top_left(x * w[None, :])
    coords = jnp.median(g @ y, axis=0)                         # (r,)
    return y @ coords

  return Aggregator("flag_aggregator", f, lambda f: 2 * f + 1, fn)


AGGREGATORS = {
    "coordinate_median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "flag_aggregator": flag_aggregator,
}
