"""Router auxiliary losses and routing metrics (pure functions, float32).

Conventions (ALGORITHMS.md §5.2, §5.3, §5.14):

* Load balancing counts **all k choices** of every token (the MegaBlocks
  convention) and is normalised so that perfect balance gives exactly 1.0,
  for every k::

    L_B = E * sum_i f_i * P_i,   f_i = count_i / A,   P_i = (1/T) sum_t p_i(t)

  ``count_i`` is the number of (token, choice) assignments routed to expert i
  and A = sum_i count_i (= T * k when every token has k assignments); f
  carries no gradient, only ``P`` does. If either f or P is uniform the loss
  is exactly 1. For k = 1 this is the Switch loss divided by its coefficient
  alpha.
* Router z-loss (ST-MoE, arXiv 2202.08906): ``L_z = mean_t logsumexp(z_t)^2``.

Assignments are given as ``expert_index[T, k]`` (int32; ``-1`` means "no
assignment") with an optional boolean ``mask[T, k]`` of assignments to count.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp


def _counts(expert_index, num_experts, mask=None):
  """Assignments per expert, float32 [E]; index -1 and masked entries skipped."""
  valid = expert_index >= 0
  if mask is not None:
    valid = valid & mask
  onehot = jax.nn.one_hot(jnp.where(valid, expert_index, -1), num_experts,
                          dtype=jnp.float32)
  return jnp.sum(onehot, axis=tuple(range(onehot.ndim - 1)))


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


@functools.partial(jax.jit, static_argnames=('axis_name',))
def load_balancing_loss(router_probs, expert_index, *, mask=None,
                        expert_weights=None, axis_name=None):
  """Switch/GShard load-balancing loss, normalised so perfect balance is 1.0.

  .. math::

    L_B = E \\sum_i \\eta_i \\, f_i \\, P_i, \\qquad
    f_i = \\frac{\\mathrm{count}_i}{\\sum_j \\mathrm{count}_j}, \\qquad
    P_i = \\frac{1}{T} \\sum_t p_i(t)

  with ``count_i`` the number of (token, choice) assignments to expert i
  (no gradient; the denominator is T * k when every token has k
  assignments) and ``eta_i`` optional per-expert weights (MoE++'s
  heterogeneous loss uses eta = tau for zero-computation experts). Uniform
  counts or uniform probabilities give exactly 1.0 (with eta = 1).
  Switch Transformers, arXiv 2101.03961; MegaBlocks, arXiv 2211.15841.

  Args:
    router_probs: [T, E] router probabilities (softmax of the logits).
    expert_index: [T, k] int expert ids; -1 marks no assignment.
    mask: optional [T, k] bool; only True assignments are counted.
    expert_weights: optional [E] weights eta_i.
    axis_name: if given, T, counts and probability sums are reduced over this
      mesh axis (global-batch balancing inside ``shard_map``).

  Returns:
    A float32 scalar.

  Example:
    >>> p = jnp.full((8, 4), 0.25); idx = jnp.arange(8)[:, None] % 4
    >>> float(load_balancing_loss(p, idx))
    1.0
  """
  probs = router_probs.astype(jnp.float32)
  t, e = probs.shape
  counts = jax.lax.stop_gradient(_counts(expert_index, e, mask))
  prob_sum = jnp.sum(probs, axis=0)
  counts, prob_sum = _psum(counts, axis_name), _psum(prob_sum, axis_name)
  total_t = _psum(jnp.float32(t), axis_name)
  frac = counts / jnp.maximum(jnp.sum(counts), 1.0)
  if expert_weights is not None:
    frac = frac * jnp.asarray(expert_weights, jnp.float32)
  return e * jnp.sum(frac * prob_sum / total_t)


@functools.partial(jax.jit, static_argnames=('axis_name',))
def router_z_loss(router_logits, *, axis_name=None):
  """Router z-loss of ST-MoE: the mean squared log-partition function.

  .. math:: L_z = \\frac{1}{T} \\sum_t \\big(\\log \\sum_j e^{z_{tj}}\\big)^2

  Zoph et al., "ST-MoE", 2022, arXiv 2202.08906. Zero logits give (log E)^2.

  Args:
    router_logits: [T, E] logits (computed in float32).
    axis_name: optional mesh axis to average over.

  Returns:
    A float32 scalar.

  Example:
    >>> float(router_z_loss(jnp.zeros((3, 4))))  # (log 4)^2
    1.921812...
  """
  z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
  t = jnp.float32(z.size)
  return _psum(jnp.sum(z * z), axis_name) / _psum(t, axis_name)


@functools.partial(jax.jit, static_argnames=('axis_name',))
def mutual_information_loss(router_probs, *, axis_name=None):
  """DS-MoE mutual-information loss ``-H(e) + mean_x H(e|x)``.

  .. math:: L_{MI} = -H\\big(\\bar p\\big) + \\frac{1}{T}\\sum_t H(p(t)),
            \\quad \\bar p = \\frac{1}{T}\\sum_t p(t)

  Pan et al., "Dense Training, Sparse Inference", 2024, arXiv 2404.05567.
  Perfectly balanced one-hot routing gives -log E.

  Args:
    router_probs: [T, E] router probabilities.
    axis_name: optional mesh axis to average over.

  Returns:
    A float32 scalar.
  """
  p = router_probs.astype(jnp.float32)
  t = _psum(jnp.float32(p.shape[0]), axis_name)
  mean_p = _psum(jnp.sum(p, axis=0), axis_name) / t
  cond = _psum(jnp.sum(_entropy(p)), axis_name) / t
  return -_entropy(mean_p) + cond


def _entropy(p):
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0),
                  axis=-1)


@functools.partial(jax.jit, static_argnames=('axis_name',))
def routing_metrics(router_probs, expert_index, *, kept=None, axis_name=None):
  """Routing metrics, all float32 and exact on every backend.

  Returns a dict with:
    * ``expert_load``: [E] fraction of kept assignments per expert (sums to 1,
      or 0 if nothing was kept) — the expert-load histogram;
    * ``tokens_per_expert_min/max/std``: kept assignments per expert;
    * ``max_violation``: (max load - mean load) / mean load;
    * ``dead_experts``: fraction of experts with no kept assignment;
    * ``fraction_dropped``: dropped / routed assignments (capacity overflow);
    * ``router_entropy``: mean over tokens of -sum_e p log p;
    * ``router_confidence``: mean over tokens of max_e p.

  Args:
    router_probs: [T, E] probabilities.
    expert_index: [T, k] expert ids (-1 = no assignment).
    kept: optional [T, k] bool, False for assignments dropped by capacity.
    axis_name: optional mesh axis to reduce over.
  """
  probs = router_probs.astype(jnp.float32)
  e = probs.shape[-1]
  routed = _psum(_counts(expert_index, e), axis_name)
  load = routed if kept is None else _psum(_counts(expert_index, e, kept),
                                           axis_name)
  n_routed, n_kept = jnp.sum(routed), jnp.sum(load)
  mean = n_kept / e
  t = _psum(jnp.float32(probs.shape[0]), axis_name)
  return {
      "expert_load": load / jnp.maximum(n_kept, 1.0),
      "tokens_per_expert_min": jnp.min(load),
      "tokens_per_expert_max": jnp.max(load),
      "tokens_per_expert_std": jnp.std(load),
      "max_violation": (jnp.max(load) - mean) / jnp.maximum(mean, 1e-9),
      "dead_experts": jnp.mean((load == 0).astype(jnp.float32)),
      "fraction_dropped": (n_routed - n_kept) / jnp.maximum(n_routed, 1.0),
      "router_entropy": _psum(jnp.sum(_entropy(probs)), axis_name) / t,
      "router_confidence": _psum(jnp.sum(jnp.max(probs, -1)), axis_name) / t,
  }
