"""Capacity: the documented formula, exactly the documented drops, reroute."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gradax.moe import capacity


@pytest.mark.parametrize("t,e,k,cf,mult,expected", [
    (64, 8, 2, 1.25, 1, 20),     # ceil(1.25 * 64 * 2 / 8) = 20
    (10, 3, 1, 1.0, 1, 4),       # ceil(10/3) = 4
    (10, 1, 1, 1.1, 1, 10),      # ceil(11) = 11, capped at T
    (64, 8, 2, 1.0, 8, 16),      # 16 is already a multiple of 8
    (64, 8, 1, 1.1, 4, 12),      # ceil(8.8) = 9 -> 12
])
def test_compute_capacity_formula(t, e, k, cf, mult, expected):
  assert capacity.compute_capacity(t, e, k, cf, multiple_of=mult) == expected


@pytest.mark.parametrize("cf", [0, 0.0, -1.0])
def test_nonpositive_capacity_factor_raises(cf):
  with pytest.raises(ValueError, match=f"capacity_factor={cf!r}"):
    capacity.compute_capacity(16, 4, 2, cf)


def _reference_keep(idx, gates, num_experts, cap, priority):
  """The module docstring's rule, written as a plain loop."""
  t, k = idx.shape
  if priority == "score":
    flat = np.argsort(-gates.reshape(-1), kind="stable")
    order = [(a // k, a % k) for a in flat]
  else:
    tokens = (np.arange(t) if priority == "k_major"
              else np.argsort(-gates[:, 0], kind="stable"))
    order = [(tok, j) for j in range(k) for tok in tokens]
  load = np.zeros(num_experts, int)
  keep = np.zeros((t, k), bool)
  for tok, j in order:
    e = idx[tok, j]
    if e >= 0 and load[e] < cap:
      load[e] += 1
      keep[tok, j] = True
  return keep


def test_k_major_drops_exactly_the_documented_tokens():
  # E = 3, C = 2. First choices go first (tokens in order), then second.
  idx = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1]])
  w = np.full(idx.shape, 0.5, np.float32)
  _, _, kept, pos = capacity.apply_capacity(jnp.asarray(idx), jnp.asarray(w),
                                            3, 2)
  # First choices: expert 0 <- tokens 0, 1 (token 2 dropped), expert 1 <- 3,
  # expert 2 <- 4. Second choices: token 0 -> 1 (slot 1), token 1 -> 2
  # (slot 1), token 2 -> 1 (full, dropped), token 3 -> 0 (full, dropped),
  # token 4 -> 1 (full, dropped).
  expected = np.array([[1, 1], [1, 1], [0, 0], [1, 0], [1, 0]], bool)
  np.testing.assert_array_equal(kept, expected)
  np.testing.assert_array_equal(
      pos, [[0, 1], [1, 1], [-1, -1], [0, -1], [0, -1]])


@pytest.mark.parametrize("priority", ["k_major", "batch_prioritized", "score"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drops_match_reference_rule(priority, seed):
  rng = np.random.default_rng(seed)
  t, e, k, cap = 20, 5, 2, 5
  idx = np.stack([rng.permutation(e)[:k] for _ in range(t)])
  idx[rng.random((t, k)) < 0.1] = -1            # some missing assignments
  gates = rng.random((t, k)).astype(np.float32)
  new_idx, new_w, kept, pos = capacity.apply_capacity(
      jnp.asarray(idx), jnp.asarray(gates), e, cap, priority=priority)
  ref = _reference_keep(idx, gates, e, cap, priority)
  np.testing.assert_array_equal(kept, ref)
  np.testing.assert_array_equal(new_idx, np.where(ref, idx, -1))
  np.testing.assert_array_equal(new_w, np.where(ref, gates, 0))
  # Slots of each expert are 0..n-1 with no repeats.
  for ex in range(e):
    slots = np.sort(np.asarray(pos)[np.asarray(new_idx) == ex])
    np.testing.assert_array_equal(slots, np.arange(len(slots)))
  assert not ref.all() and ref.any()


def test_bpr_prefers_confident_tokens():
  # Two tokens want expert 0, capacity 1: BPR keeps the one with the larger
  # top-1 gate even though it comes second.
  idx = jnp.array([[0], [0]])
  gates = jnp.array([[0.3], [0.9]])
  _, _, kept_k, _ = capacity.apply_capacity(idx, gates, 2, 1)
  _, _, kept_b, _ = capacity.apply_capacity(idx, gates, 2, 1,
                                            priority="batch_prioritized")
  np.testing.assert_array_equal(kept_k[:, 0], [True, False])
  np.testing.assert_array_equal(kept_b[:, 0], [False, True])


def _reference_reroute(idx, gates, probs, cap):
  t, k = idx.shape
  e = probs.shape[1]
  keep = _reference_keep(idx, gates, e, cap, "score")
  new_idx = np.where(keep, idx, -1)
  new_w = np.where(keep, gates, 0.0)
  load = np.bincount(new_idx[new_idx >= 0], minlength=e)
  for a in np.argsort(-gates.reshape(-1), kind="stable"):
    tok, j = a // k, a % k
    if idx[tok, j] < 0 or keep[tok, j]:
      continue
    used = set(new_idx[tok][new_idx[tok] >= 0]) | set(idx[tok][idx[tok] >= 0])
    best, best_p = -1, -np.inf
    for ex in range(e):
      if ex not in used and load[ex] < cap and probs[tok, ex] > best_p:
        best, best_p = ex, probs[tok, ex]
    if best >= 0:
      new_idx[tok, j], new_w[tok, j] = best, probs[tok, best]
      load[best] += 1
  return new_idx, new_w


@pytest.mark.parametrize("seed", [0, 1])
def test_reroute_matches_reference_and_respects_capacity(seed):
  rng = np.random.default_rng(seed)
  t, e, k = 16, 6, 2
  logits = rng.normal(size=(t, e)) + np.array([3.0, 2.0, 0, 0, 0, 0])  # skewed
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  gates = np.take_along_axis(probs, idx, 1).astype(np.float32)
  cap = capacity.compute_capacity(t, e, k, 1.0)
  new_idx, new_w, kept = capacity.reroute_overflow(
      jnp.asarray(idx), jnp.asarray(gates), jnp.asarray(probs, jnp.float32),
      cap)
  ref_idx, ref_w = _reference_reroute(idx, gates, probs.astype(np.float32), cap)
  np.testing.assert_array_equal(new_idx, ref_idx)
  np.testing.assert_allclose(new_w, ref_w, rtol=1e-6)
  new_idx = np.asarray(new_idx)
  assert np.bincount(new_idx[new_idx >= 0], minlength=e).max() <= cap
  for row in new_idx:                           # a token's experts stay distinct
    row = row[row >= 0]
    assert len(set(row)) == len(row)
  # With total room T * k >= assignments, rerouting keeps more than dropping.
  _, _, kept_drop, _ = capacity.drop_overflow(jnp.asarray(idx),
                                              jnp.asarray(gates), e, cap)
  assert int(kept.sum()) > int(kept_drop.sum())
  assert math.isclose(float(kept.sum()), t * k)   # room for all: none lost
