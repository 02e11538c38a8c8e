"""Expert capacity: slot assignment with priorities, drop and reroute.

gradax's capacity is (ALGORITHMS.md §5.1)::

    C = ceil(capacity_factor * T * k / E)      (optionally rounded up to a multiple)

with T tokens in the routing group, k choices per token and E experts.
``capacity_factor=None`` means dropless. The anchors disagree (flaxformer has no
k, DeepSpeed doubles CF for top-2, ...), so every docstring restates this.

Priority decides which assignments take the C slots of an expert:

* ``"k_major"`` (default): every token's first choice before any token's
  second choice; within one choice rank, tokens in order.
* ``"batch_prioritized"`` (BPR, Riquelme et al. 2021): as k_major, but tokens
  ordered by descending top-1 gate (stable).
* ``"score"``: all assignments by descending gate (stable) — capacity-aware
  inference's Token Drop (He et al., arXiv 2503.05066): an overloaded expert
  keeps its C highest-gate tokens.

An assignment at position >= C is dropped; its token keeps the residual.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

PRIORITIES = ("k_major", "batch_prioritized", "score")


def check_capacity_factor(capacity_factor, name="capacity_factor"):
  """Raises ValueError unless capacity_factor is None or a number > 0."""
  if capacity_factor is None:
    return
  if not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
    raise ValueError(
        f"{name}={capacity_factor!r} is invalid: it must be a number > 0 "
        "(or None for dropless routing).")


def compute_capacity(num_tokens, num_experts, k, capacity_factor,
                     multiple_of=1):
  """Per-expert capacity ``C = ceil(capacity_factor * T * k / E)``.

  Rounded up to a multiple of ``multiple_of``, and capped at T (rounded up
  the same way): an expert can receive at most T assignments because a
  token's k experts are distinct.

  Args:
    num_tokens: T, tokens in the routing group.
    num_experts: E.
    k: choices per token.
    capacity_factor: CF > 0.
    multiple_of: round C up to a multiple of this (e.g. 4 or 8).

  Returns:
    C as a Python int.

  Example:
    >>> compute_capacity(64, 8, 2, 1.25)   # ceil(1.25 * 64 * 2 / 8)
    20
  """
  check_capacity_factor(capacity_factor)
  if capacity_factor is None:
    raise ValueError("capacity_factor=None (dropless) has no capacity.")
  if num_experts < 1 or k < 1 or num_tokens < 1:
    raise ValueError(
        f"num_tokens={num_tokens}, num_experts={num_experts}, k={k}: all must "
        "be >= 1.")
  if multiple_of < 1:
    raise ValueError(f"multiple_of={multiple_of} must be >= 1.")
  c = math.ceil(capacity_factor * num_tokens * k / num_experts - 1e-9)
  c = max(1, -(-c // multiple_of) * multiple_of)
  return int(min(c, -(-num_tokens // multiple_of) * multiple_of))


def _assignment_order(expert_index, gates, priority):
  """Flat (t * k + j) assignment ids in priority order."""
  t, k = expert_index.shape
  if priority not in PRIORITIES:
    raise ValueError(f"priority={priority!r} is invalid; allowed: {PRIORITIES}.")
  if priority != "k_major" and gates is None:
    raise ValueError(f"priority={priority!r} needs the gates; gates=None.")
  if priority == "score":
    return jnp.argsort(-gates.astype(jnp.float32).reshape(-1), stable=True)
  if priority == "k_major":
    tokens = jnp.arange(t)
  else:
    tokens = jnp.argsort(-gates[:, 0].astype(jnp.float32), stable=True)
  return (tokens[None, :] * k + jnp.arange(k)[:, None]).reshape(-1)


@functools.partial(jax.jit, static_argnames=('num_experts', 'priority'))
def slot_positions(expert_index, num_experts, *, priority="k_major",
                   gates=None):
  """Position of each assignment in its expert's queue.

  An assignment's slot is (the number of earlier assignments, in priority
  order, to the same expert); it is kept iff slot < C. Index -1 gets -1.

  Args:
    expert_index: [T, k] int expert ids, -1 for none.
    num_experts: E.
    priority: ``"k_major"``, ``"batch_prioritized"`` or ``"score"``.
    gates: [T, k] combine weights (needed for the last two priorities).

  Returns:
    [T, k] int32 positions.
  """
  order = _assignment_order(expert_index, gates, priority)
  flat = expert_index.reshape(-1)[order]
  onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)   # -1 -> zeros
  pos_sorted = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1
  pos = jnp.zeros_like(pos_sorted).at[order].set(pos_sorted)
  return pos.reshape(expert_index.shape).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('num_experts', 'capacity', 'priority'))
def apply_capacity(expert_index, combine_weights, num_experts, capacity, *,
                   priority="k_major"):
  """Drops the assignments beyond each expert's capacity.

  ``C`` is usually ``compute_capacity(T, E, k, CF)`` = ceil(CF * T * k / E).

  Args:
    expert_index: [T, k] expert ids (-1 for none).
    combine_weights: [T, k] gates.
    num_experts: E.
    capacity: C, or None for no limit.
    priority: see the module docstring.

  Returns:
    ``(expert_index, combine_weights, kept, positions)``: dropped assignments
    get index -1 and weight 0; ``kept`` is the [T, k] bool mask of surviving
    (valid) assignments.
  """
  valid = expert_index >= 0
  if capacity is None:
    pos = jnp.where(valid, 0, -1).astype(jnp.int32)
    return expert_index, combine_weights, valid, pos
  pos = slot_positions(expert_index, num_experts, priority=priority,
                       gates=combine_weights)
  kept = valid & (pos < capacity)
  return (jnp.where(kept, expert_index, -1), jnp.where(kept, combine_weights, 0),
          kept, jnp.where(kept, pos, -1))


def drop_overflow(expert_index, combine_weights, num_experts, capacity):
  """Capacity-aware Token Drop: each expert keeps its C highest-gate tokens.

  He et al., "Capacity-Aware Inference", 2025, arXiv 2503.05066, with
  C = ceil(gamma * T * k / E) (gamma is the capacity factor).

  Returns:
    Same as ``apply_capacity`` with ``priority="score"``.
  """
  return apply_capacity(expert_index, combine_weights, num_experts, capacity,
                        priority="score")


@functools.partial(jax.jit, static_argnames=('capacity',))
def reroute_overflow(expert_index, combine_weights, router_probs, capacity):
  """Capacity-aware rerouting: overflow goes to the next-best expert with room.

  First the Token-Drop pass keeps, per expert, the C highest-gate assignments
  (C = ceil(gamma * T * k / E)). Then the dropped assignments, in descending
  gate order, each move to the highest-probability expert that the token does
  not already use and that still has a free slot; its combine weight becomes
  that expert's router probability. If no expert has room, the assignment is
  dropped. Rerouting never displaces an assignment kept in the first pass.
  After "Expanded Drop" / Token Reroute, He et al., arXiv 2503.05066.

  Args:
    expert_index: [T, k] expert ids (-1 for none).
    combine_weights: [T, k] gates.
    router_probs: [T, E] probabilities ranking the fallback experts.
    capacity: C per expert.

  Returns:
    ``(expert_index, combine_weights, kept)``: kept is False for assignments
    dropped for lack of any free slot (and for input index -1).
  """
  t, k = expert_index.shape
  e = router_probs.shape[-1]
  idx, w, kept, _ = drop_overflow(expert_index, combine_weights, e, capacity)
  load = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.int32), axis=(0, 1))
  overflow = (expert_index >= 0) & ~kept
  order = jnp.argsort(-combine_weights.astype(jnp.float32).reshape(-1),
                      stable=True)
  probs = router_probs.astype(jnp.float32)

  def step(carry, a):
    idx, w, load = carry
    tok, j = a // k, a % k
    used = jnp.zeros((e,), bool).at[jnp.where(idx[tok] >= 0, idx[tok], e)].set(
        True, mode="drop")
    used = used.at[jnp.where(expert_index[tok] >= 0, expert_index[tok], e)].set(
        True, mode="drop")
    ok = ~used & (load < capacity)
    score = jnp.where(ok, probs[tok], -jnp.inf)
    best = jnp.argmax(score)
    move = overflow.reshape(-1)[a] & ok[best]
    idx = idx.at[tok, j].set(jnp.where(move, best, idx[tok, j]))
    w = w.at[tok, j].set(jnp.where(move, probs[tok, best], w[tok, j]))
    load = load.at[best].add(move.astype(jnp.int32))
    return (idx, w, load), None

  (idx, w, _), _ = jax.lax.scan(step, (idx, w, load), order)
  return idx, w, idx >= 0
