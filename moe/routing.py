"""Routers: router logits in, a ``RoutingResult`` (indices, weights, losses) out.

Every router runs in float32 (selective precision, ALGORITHMS.md §5) and
returns the decision as data, with its aux losses and metrics alongside
(flaxformer style, §8.2). The decision is token-major:

* ``expert_index[T, k]`` int32 expert ids, ``-1`` for "no assignment";
* ``combine_weights[T, k]`` float32 gates, 0 where there is no assignment.

Expert choice uses ``k = E`` columns: column e holds e when expert e picked the
token and -1 otherwise, so all dispatchers handle it unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradax.moe import losses


class RoutingResult(NamedTuple):
  """A routing decision and what comes with it.

  Attributes:
    expert_index: [T, k] int32 expert ids, -1 marks no assignment.
    combine_weights: [T, k] float32 gate of each assignment.
    router_probs: [T, E] float32 probabilities used by the losses.
    router_logits: [T, E] float32 logits (zeros for hash routing).
    aux_losses: {"load_balancing_loss", "router_z_loss"} unweighted scalars.
    metrics: dict of float32 routing metrics (see ``losses.routing_metrics``).
  """
  expert_index: jax.Array
  combine_weights: jax.Array
  router_probs: jax.Array
  router_logits: jax.Array
  aux_losses: dict[str, Any]
  metrics: dict[str, Any]


SOFTMAX_ORDERS = ("softmax_topk", "topk_softmax")


def check_k(k, num_experts):
  """Raises ValueError unless 1 <= k <= num_experts."""
  if not isinstance(k, (int, np.integer)) or k < 1 or k > num_experts:
    raise ValueError(
        f"k={k!r} is invalid: k must be an integer with 1 <= k <= "
        f"num_experts={num_experts}.")


def router_logits(x, router_weight, *, jitter_eps=0.0, rng=None):
  """Router logits ``z = (x * jitter) @ W_r`` computed in float32.

  Jitter is multiplicative on the router input, ``U(1 - eps, 1 + eps)``
  (flaxformer; MegaBlocks ``moe_jitter_eps``); ST-MoE found it hurts quality.

  Args:
    x: [T, d] tokens.
    router_weight: [d, E].
    jitter_eps: noise half-width; 0 disables jitter.
    rng: PRNG key, required when ``jitter_eps > 0``.

  Returns:
    [T, E] float32 logits.
  """
  if jitter_eps < 0:
    raise ValueError(f"jitter_eps={jitter_eps} must be >= 0.")
  x = x.astype(jnp.float32)
  if jitter_eps > 0:
    if rng is None:
      raise ValueError("jitter_eps > 0 needs an rng key; rng=None was given.")
    x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - jitter_eps,
                               1.0 + jitter_eps)
  return x @ router_weight.astype(jnp.float32)


def _result(logits, probs, index, weights, *, lb_probs=None):
  index = index.astype(jnp.int32)
  weights = jnp.where(index >= 0, weights, 0.0).astype(jnp.float32)
  aux = {
      "load_balancing_loss": losses.load_balancing_loss(
          probs if lb_probs is None else lb_probs, index),
      "router_z_loss": losses.router_z_loss(logits),
  }
  metrics = losses.routing_metrics(probs, index)
  return RoutingResult(index, weights, probs, logits, aux, metrics)


@functools.partial(jax.jit, static_argnames=('k', 'order', 'renormalize'))
def top_k_routing(logits, k, *, order="softmax_topk", renormalize=False):
  """Token-choice top-k routing.

  * ``order="softmax_topk"``: p = softmax(z); keep the k largest p; weights are
    those p, divided by their sum if ``renormalize``.
  * ``order="topk_softmax"`` (MaxText default): take the top-k logits and
    apply softmax over the k selected (weights already sum to 1).

  Ties go to the lower expert id (``lax.top_k``). y = sum_j w_j FFN_j(x).

  Args:
    logits: [T, E] router logits.
    k: experts per token, 1 <= k <= E.
    order: ``"softmax_topk"`` or ``"topk_softmax"``.
    renormalize: renormalise the k weights (``softmax_topk`` only).

  Returns:
    A ``RoutingResult`` with k columns.

  Example:
    >>> r = top_k_routing(jnp.zeros((4, 8)), k=2)
    >>> r.expert_index.shape, float(r.aux_losses["load_balancing_loss"])
    ((4, 2), 1.0)
  """
  logits = logits.astype(jnp.float32)
  check_k(k, logits.shape[-1])
  if order not in SOFTMAX_ORDERS:
    raise ValueError(f"order={order!r} is invalid; allowed: {SOFTMAX_ORDERS}.")
  probs = jax.nn.softmax(logits, axis=-1)
  if order == "softmax_topk":
    weights, index = jax.lax.top_k(probs, k)
    if renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  else:
    top_logits, index = jax.lax.top_k(logits, k)
    weights = jax.nn.softmax(top_logits, axis=-1)
  return _result(logits, probs, index, weights)


def switch_routing(logits):
  """Switch Transformer top-1: expert argmax p, gate p_max (no renormalising).

  Fedus, Zoph, Shazeer, 2021, arXiv 2101.03961.

  Args:
    logits: [T, E] router logits.

  Returns:
    A ``RoutingResult`` with one column.
  """
  return top_k_routing(logits, 1)


@functools.partial(jax.jit, static_argnames=())
def gshard_top2_routing(logits, *, rng=None):
  """GShard top-2 routing with the random second-expert policy.

  g1, g2 are the two largest softmax probabilities, renormalised to
  g1 + g2 = 1. The second expert is kept with probability min(1, 2 g2) when
  ``rng`` is given (GShard's "random" policy) and always kept otherwise.
  Lepikhin et al., "GShard", 2020, arXiv 2006.16668.

  Args:
    logits: [T, E] router logits, E >= 2.
    rng: optional PRNG key for the random second-expert policy.

  Returns:
    A ``RoutingResult``; a discarded second choice has index -1.
  """
  logits = logits.astype(jnp.float32)
  check_k(2, logits.shape[-1])
  probs = jax.nn.softmax(logits, axis=-1)
  weights, index = jax.lax.top_k(probs, 2)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  if rng is not None:
    keep2 = jax.random.uniform(rng, weights[:, 1].shape) < 2.0 * weights[:, 1]
    index = index.at[:, 1].set(jnp.where(keep2, index[:, 1], -1))
  return _result(logits, probs, index, weights)


@functools.partial(jax.jit, static_argnames=('capacity_factor',))
def expert_choice_routing(logits, *, capacity_factor=2.0):
  """Expert choice: every expert picks its top-C tokens.

  S = softmax(z) over experts; each expert e takes the C tokens with the
  largest S[:, e], C = ceil(capacity_factor * T / E); gates are those S.
  A token gets between 0 and E experts; load is perfectly balanced, so the
  load-balancing loss is exactly 1 with zero gradient. Not causal.
  Zhou et al., NeurIPS 2022, arXiv 2202.09368.

  Args:
    logits: [T, E] router logits.
    capacity_factor: c > 0, the mean number of experts per token.

  Returns:
    A ``RoutingResult`` with k = E columns (column e holds e or -1).
  """
  logits = logits.astype(jnp.float32)
  t, e = logits.shape
  if not capacity_factor > 0:
    raise ValueError(
        f"capacity_factor={capacity_factor} must be > 0 for expert choice.")
  c = min(t, int(np.ceil(capacity_factor * t / e)))
  probs = jax.nn.softmax(logits, axis=-1)
  _, tokens = jax.lax.top_k(probs.T, c)                           # [E, C]
  chosen = jnp.zeros((e, t), bool).at[jnp.arange(e)[:, None], tokens].set(True)
  index = jnp.where(chosen.T, jnp.arange(e)[None, :], -1)
  return _result(logits, probs, index, probs)


def _mix32(x):
  # murmur3's 32-bit finaliser: a fixed, well-mixed integer hash
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


@functools.partial(jax.jit, static_argnames=('num_experts', 'seed'))
def hash_routing(token_ids, num_experts, *, seed=0):
  """Hash routing: a fixed hash of the token id picks one expert, gate 1.

  expert(t) = h(id_t + seed) mod E with murmur3's 32-bit finaliser h; no
  parameters and no aux loss (it is still reported). Roller et al., "Hash
  Layers For Large Sparse Models", 2021, arXiv 2106.04426.

  Args:
    token_ids: [T] int token ids.
    num_experts: E >= 1.
    seed: changes the hash.

  Returns:
    A ``RoutingResult`` with one column; probs are the one-hot assignment.
  """
  if num_experts < 1:
    raise ValueError(f"num_experts={num_experts} must be >= 1.")
  h = _mix32(token_ids.astype(jnp.uint32) + jnp.uint32(seed))
  index = (h % jnp.uint32(num_experts)).astype(jnp.int32)[:, None]
  probs = jax.nn.one_hot(index[:, 0], num_experts, dtype=jnp.float32)
  logits = jnp.zeros_like(probs)
  return _result(logits, probs, index, jnp.ones(index.shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=('k',))
def m6t_routing(logits, k):
  """M6-T "k top-1" (expert prototyping).

  The E experts form k prototypes of E/k consecutive experts; each prototype
  has its own softmax gate and routes top-1:
  y = sum_j g_{j,i*_j}(x) FFN_{j,i*_j}(x). Yang et al., 2021, arXiv 2105.15082.
  For the balance loss, P_i is the prototype softmax divided by k.

  Args:
    logits: [T, E] router logits; E divisible by k.
    k: number of prototypes.

  Returns:
    A ``RoutingResult`` with k columns, column j in prototype j.
  """
  logits = logits.astype(jnp.float32)
  t, e = logits.shape
  check_k(k, e)
  if e % k:
    raise ValueError(
        f"num_experts={e} is not divisible by k={k}; M6-T splits the experts "
        "into k equal prototypes.")
  g = e // k
  group_probs = jax.nn.softmax(logits.reshape(t, k, g), axis=-1)
  local = jnp.argmax(group_probs, axis=-1)                        # [T, k]
  weights = jnp.take_along_axis(group_probs, local[..., None], -1)[..., 0]
  index = local + g * jnp.arange(k)[None, :]
  probs = group_probs.reshape(t, e) / k
  return _result(logits, probs, index, weights)
