"""Server aggregators: optax-like ``(init, apply)`` pairs over client updates.

An aggregator turns the stacked updates Δ_n = y_n − x_t of the clients that
took part (plus participation metadata) into one model update:

  ``init(params, num_clients) -> state``
  ``apply(inputs: AggregatorInput, state) -> (aggregate, state)``

The server then feeds ``-aggregate`` as a pseudo-gradient to its optax
optimizer (``sgd(η)`` gives x_{t+1} = x_t + η·aggregate).

Weighting rules (N = total clients, S_t = participants):

* ``example_weighted_mean``: Σ_{S_t} m_n Δ_n / Σ_{S_t} m_n (FedAvg).
* ``participant_mean``: (1/|S_t|) Σ_{S_t} Δ_n ("average participating").
* ``average_all``: (1/N) Σ_{S_t} Δ_n.
* ``known_probability(p)``: (1/N) Σ_{S_t} Δ_n / p_n (the oracle of FedAU).
* ``fedau(cutoff)`` (in ``fedau.py``): (1/N) Σ_{S_t} ω_n Δ_n.
* ``coordinate_median`` / ``trimmed_mean``: robust, per coordinate.
* ``gaussian_dp(inner, clip_norm, noise_multiplier)``: clip each update to L2
  norm C, aggregate, add N(0, (σ·C/|S_t|)²) noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class AggregatorInput(NamedTuple):
  """What an aggregator sees in one round.

  Attributes:
    updates: pytree with leading axis ``[C]`` (C slots; invalid slots are 0).
    client_ids: ``[C]`` int32 id of the client in each slot.
    valid: ``[C]`` bool, whether the slot holds a participant.
    num_examples: ``[C]`` int32 example counts.
    participating: ``[N]`` bool over ALL clients (FedAU needs who did not).
  """
  updates: PyTree
  client_ids: jax.Array
  valid: jax.Array
  num_examples: jax.Array
  participating: jax.Array


class Aggregator(NamedTuple):
  """``init(params, num_clients) -> state``; ``apply(inputs, state) -> (agg, state)``."""
  init: Callable
  apply: Callable


def _bcast(w, x):
  return w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def weighted_sum(updates: PyTree, weights: jax.Array) -> PyTree:
  """Σ_c weights[c] · updates[c] for a pytree with a leading client axis."""
  return jax.tree.map(lambda u: jnp.sum(_bcast(weights, u) * u, axis=0),
                      updates)


def _stateless(weight_fn: Callable) -> Aggregator:
  def init(params, num_clients):
    del params, num_clients
    return ()

  def apply(inputs: AggregatorInput, state):
    return weighted_sum(inputs.updates, weight_fn(inputs)), state

  return Aggregator(init, apply)


def example_weighted_mean() -> Aggregator:
  """FedAvg: Σ_{S_t} m_n Δ_n / Σ_{S_t} m_n (0 when nobody takes part)."""
  def w(inp):
    m = jnp.where(inp.valid, inp.num_examples, 0).astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m), 1.0)
  return _stateless(w)


def participant_mean() -> Aggregator:
  """(1/|S_t|) Σ_{S_t} Δ_n (0 when nobody takes part)."""
  def w(inp):
    v = inp.valid.astype(jnp.float32)
    return v / jnp.maximum(jnp.sum(v), 1.0)
  return _stateless(w)


def average_all(num_clients: int) -> Aggregator:
  """(1/N) Σ_{S_t} Δ_n: unbiased only under equal participation."""
  _check_num_clients(num_clients)

  def w(inp):
    return inp.valid.astype(jnp.float32) / num_clients
  return _stateless(w)


def known_probability(probs) -> Aggregator:
  """(1/N) Σ_{S_t} Δ_n / p_n: the oracle that knows each p_n.

  Args:
    probs: ``[N]`` participation probabilities in (0, 1].
  """
  probs = check_probabilities(probs)
  n = probs.shape[0]
  inv = jnp.asarray(1.0 / probs, jnp.float32)

  def w(inp):
    return jnp.where(inp.valid, inv[inp.client_ids], 0.0) / n
  return _stateless(w)


def check_probabilities(probs, name: str = "probs") -> np.ndarray:
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 1 or probs.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array of per-client "
                     f"probabilities, got shape {probs.shape}.")
  bad = ~((probs > 0) & (probs <= 1))
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
        f"{name}[{i}] = {probs[i]!r} is outside (0, 1]; participation "
        "probabilities must satisfy 0 < p <= 1.")
  return probs


def _check_num_clients(num_clients):
  if int(num_clients) < 1:
    raise ValueError(
        f"num_clients must be a positive integer, got {num_clients}.")


def coordinate_median() -> Aggregator:
  """Per-coordinate median of the participants' updates (robust)."""
  def init(params, num_clients):
    del params, num_clients
    return ()

  def apply(inp, state):
    def med(u):
      x = jnp.where(_bcast(inp.valid, u).astype(bool), u.astype(jnp.float32),
                    jnp.nan)
      m = jnp.nanmedian(x, axis=0)
      return jnp.where(jnp.any(inp.valid), m, 0.0).astype(u.dtype)
    return jax.tree.map(med, inp.updates), state

  return Aggregator(init, apply)


def trimmed_mean(trim: float) -> Aggregator:
  """Per-coordinate mean after dropping the ⌊trim·|S_t|⌋ largest and smallest.

  Args:
    trim: fraction in [0, 0.5) trimmed at each end.
  """
  if not 0.0 <= float(trim) < 0.5:
    raise ValueError(f"trim must lie in [0, 0.5), got {trim}.")

  def init(params, num_clients):
    del params, num_clients
    return ()

  def apply(inp, state):
    c = jnp.sum(inp.valid.astype(jnp.int32))
    k = jnp.floor(trim * c).astype(jnp.int32)

    def tm(u):
      x = jnp.where(_bcast(inp.valid, u).astype(bool), u.astype(jnp.float32),
                    jnp.inf)
      xs = jnp.sort(x, axis=0)
      r = jnp.arange(u.shape[0])
      keep = (r >= k) & (r < c - k)
      keep = _bcast(keep, xs).astype(bool)
      s = jnp.sum(jnp.where(keep, xs, 0.0), axis=0)
      cnt = jnp.maximum(c - 2 * k, 1).astype(jnp.float32)
      return (s / cnt).astype(u.dtype)
    return jax.tree.map(tm, inp.updates), state

  return Aggregator(init, apply)


class DPState(NamedTuple):
  inner: PyTree
  key: jax.Array            # raw uint32 key, split each round
  noise_std: jax.Array      # std of the noise added in the last round
  rounds: jax.Array         # int32 rounds with noise so far


def clip_by_norm(updates: PyTree, clip_norm: float):
  """Clips each client's update (leading axis) to L2 norm ≤ clip_norm."""
  sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32)).reshape(u.shape[0], -1),
                   axis=1) for u in jax.tree.leaves(updates))
  norm = jnp.sqrt(sq)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda u: u * _bcast(scale, u), updates), norm


def gaussian_dp(inner: Aggregator, clip_norm: float, noise_multiplier: float,
                seed: int = 0) -> Aggregator:
  """Differential privacy wrapper: per-client clipping plus Gaussian noise.

  Each update is clipped to L2 norm C, ``inner`` aggregates (use a mean such as
  ``participant_mean``, whose per-client sensitivity is C/|S_t|), then
  N(0, (σ·C/|S_t|)²) is added per coordinate. The state reports the noise
  multiplier σ's resulting ``noise_std`` and the number of noised rounds, which
  an accountant needs (Abadi et al. 2016, arXiv 1607.00133; DP-FedAvg,
  McMahan et al. 2018, arXiv 1710.06963).

  Args:
    inner: the aggregator applied to the clipped updates.
    clip_norm: C > 0.
    noise_multiplier: σ ≥ 0.
    seed: seed of the noise.

  Returns:
    An ``Aggregator``; ``.noise_multiplier`` is not stored on it, read it from
    your configuration or ``state.noise_std * |S_t| / C``.
  """
  if not float(clip_norm) > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm}.")
  if not float(noise_multiplier) >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")

  def init(params, num_clients):
    return DPState(inner.init(params, num_clients),
                   jax.random.key_data(jax.random.key(seed)),
                   jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

  def apply(inp, state):
    clipped, _ = clip_by_norm(inp.updates, clip_norm)
    clipped = jax.tree.map(
        lambda u: jnp.where(_bcast(inp.valid, u).astype(bool), u, 0), clipped)
    agg, inner_state = inner.apply(inp._replace(updates=clipped), state.inner)
    cnt = jnp.maximum(jnp.sum(inp.valid.astype(jnp.float32)), 1.0)
    std = noise_multiplier * clip_norm / cnt
    key = jax.random.wrap_key_data(state.key)
    key, sub = jax.random.split(key)
    leaves, treedef = jax.tree.flatten(agg)
    subs = jax.random.split(sub, len(leaves))
    noised = [l + (std * jax.random.normal(k, l.shape)).astype(l.dtype)
              for l, k in zip(leaves, subs)]
    return jax.tree.unflatten(treedef, noised), DPState(
        inner_state, jax.random.key_data(key), std.astype(jnp.float32),
        state.rounds + 1)

  return Aggregator(init, apply)
