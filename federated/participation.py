"""Participation models: who takes part in each round, seeded and reproducible.

Every model has ``num_clients`` and ``sample(num_rounds, seed) -> [T, N] bool``
(numpy, the same array for the same seed), so the mask can be fed as ``xs`` of
a ``lax.scan`` over rounds or sent to a Flower server. Models follow the
patterns of ``IBM/fedau`` (``util/util.py``): Bernoulli, two-state Markov and
cyclic, with heterogeneous p_n that can be correlated with the clients' labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gradax.federated.aggregators import check_probabilities


def _check_n(num_clients):
  if isinstance(num_clients, bool) or int(num_clients) < 1:
    raise ValueError(
        f"num_clients must be a positive integer, got {num_clients!r}.")
  return int(num_clients)


def _check_t(num_rounds):
  if int(num_rounds) < 1:
    raise ValueError(f"num_rounds must be >= 1, got {num_rounds}.")
  return int(num_rounds)


@dataclasses.dataclass(frozen=True)
class Full:
  """Every client in every round."""
  num_clients: int

  def __post_init__(self):
    _check_n(self.num_clients)

  @property
  def probs(self):
    return np.ones(self.num_clients)

  def sample(self, num_rounds: int, seed: int = 0) -> np.ndarray:
    del seed
    return np.ones((_check_t(num_rounds), self.num_clients), bool)


@dataclasses.dataclass(frozen=True)
class UniformSample:
  """m clients drawn uniformly without replacement each round."""
  num_clients: int
  m: int

  def __post_init__(self):
    n = _check_n(self.num_clients)
    if not 1 <= int(self.m) <= n:
      raise ValueError(
          f"m must lie in [1, num_clients={n}], got {self.m}.")

  @property
  def probs(self):
    return np.full(self.num_clients, self.m / self.num_clients)

  def sample(self, num_rounds: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((_check_t(num_rounds), self.num_clients), bool)
    for t in range(num_rounds):
      out[t, rng.choice(self.num_clients, self.m, replace=False)] = True
    return out


class Bernoulli:
  """Client n takes part independently with probability p_n each round."""

  def __init__(self, probs):
    self.probs = check_probabilities(probs)
    self.num_clients = self.probs.shape[0]

  def sample(self, num_rounds: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((_check_t(num_rounds), self.num_clients)) < self.probs


class Markov:
  """Two-state chain per client with stationary probability p_n.

  P(inactive→active) = a, P(active→inactive) = a·(1/p_n − 1); if the latter
  exceeds 1 both are divided by it. The initial state is Bernoulli(p_n); each
  round first transitions, then reports the state (as in ``IBM/fedau``).
  """

  def __init__(self, probs, to_active: float = 0.05):
    self.probs = check_probabilities(probs)
    self.num_clients = self.probs.shape[0]
    if not 0 < float(to_active) <= 1:
      raise ValueError(f"to_active must lie in (0, 1], got {to_active}.")
    up = np.full(self.num_clients, float(to_active))
    down = up * (1.0 / self.probs - 1.0)
    over = down > 1
    up[over] /= down[over]
    down[over] = 1.0
    self.to_active, self.to_inactive = up, down

  def sample(self, num_rounds: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = _check_t(num_rounds)
    state = rng.random(self.num_clients) < self.probs
    out = np.zeros((t, self.num_clients), bool)
    for r in range(t):
      u = rng.random(self.num_clients)
      state = np.where(state, u >= self.to_inactive, u < self.to_active)
      out[r] = state
    return out


class Cyclic:
  """Active for round(cycle·p_n) consecutive rounds per cycle, random phase."""

  def __init__(self, probs, cycle: int = 100):
    self.probs = check_probabilities(probs)
    self.num_clients = self.probs.shape[0]
    if int(cycle) < 2:
      raise ValueError(f"cycle must be an integer >= 2, got {cycle}.")
    self.cycle = int(cycle)
    self.active = np.maximum(1, np.round(self.cycle * self.probs)).astype(int)
    self.inactive = np.maximum(1, self.cycle - self.active)

  def sample(self, num_rounds: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = _check_t(num_rounds)
    to_switch = rng.integers(0, self.inactive)   # starts inactive
    active = np.zeros(self.num_clients, bool)
    out = np.zeros((t, self.num_clients), bool)
    for r in range(t):
      flip = to_switch == 0
      active = np.where(flip, ~active, active)
      to_switch = np.where(flip, np.where(active, self.active, self.inactive),
                           to_switch) - 1
      out[r] = active
    return out


def label_correlated_probs(label_dist, mean: float = 0.1, floor: float = 0.02,
                           alpha: float = 0.1, seed: int = 0) -> np.ndarray:
  """p_n = mean·C·Σ_c q_{n,c}·a_c with a ~ Dir(α·1_C), floored (IBM/fedau).

  Args:
    label_dist: ``[N, C]`` each client's label distribution q_n.
    mean: target mean participation probability.
    floor: lower bound of p_n.
    alpha: Dirichlet concentration of the label multipliers a.
    seed: seed of a.

  Returns:
    ``[N]`` probabilities, clipped to (floor, 1].
  """
  q = np.asarray(label_dist, np.float64)
  if q.ndim != 2:
    raise ValueError(f"label_dist must be [N, C], got shape {q.shape}.")
  if not 0 < float(floor) <= 1:
    raise ValueError(f"floor must lie in (0, 1], got {floor}.")
  a = np.random.default_rng(seed).dirichlet(alpha * np.ones(q.shape[1]))
  p = mean * q.shape[1] * (q @ a)
  return np.clip(np.maximum(floor, p), floor, 1.0)


def fedprox_stragglers(num_clients: int, clients_per_round: int,
                       drop_percent: float, epochs: int, num_rounds: int,
                       seed: int = 0):
  """The FedProx straggler protocol (``litian96/FedProx`` trainers).

  Each round K clients are selected uniformly; round(K·(1 − drop)) of them are
  active and do E epochs; the other selected ones are stragglers that do
  randint(1, E) ∈ {1..E−1} epochs. FedAvg drops stragglers, FedProx keeps them.

  Returns:
    ``(selected [T,N] bool, active [T,N] bool, epochs [T,N] int32)``; feed
    ``selected`` (FedProx) or ``active`` (FedAvg) as participation.
  """
  n = _check_n(num_clients)
  if not 1 <= int(clients_per_round) <= n:
    raise ValueError(f"clients_per_round must lie in [1, {n}], got "
                     f"{clients_per_round}.")
  if not 0 <= float(drop_percent) <= 1:
    raise ValueError(f"drop_percent must lie in [0, 1], got {drop_percent}.")
  if int(epochs) < 2:
    raise ValueError(f"epochs must be >= 2 (stragglers do 1..E-1), got "
                     f"{epochs}.")
  t = _check_t(num_rounds)
  k = int(clients_per_round)
  sel = np.zeros((t, n), bool)
  act = np.zeros((t, n), bool)
  work = np.zeros((t, n), np.int32)
  for r in range(t):
    rng = np.random.default_rng([seed, r])
    chosen = rng.choice(n, k, replace=False)
    active = rng.choice(chosen, int(round(k * (1 - drop_percent))),
                        replace=False)
    sel[r, chosen] = True
    act[r, active] = True
    work[r, chosen] = rng.integers(1, epochs, size=k)
    work[r, active] = epochs
  return sel, act, work


def check_matches(model, num_clients: int):
  """Raises if a participation model and the data disagree on N."""
  if model.num_clients != num_clients:
    raise ValueError(
        f"the participation model covers {model.num_clients} clients but the "
        f"data holds {num_clients}; they must match.")
