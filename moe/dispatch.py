"""Dispatchers: send tokens to experts and combine the results.

Every dispatcher has one interface (vmoe's abstraction, ALGORITHMS.md §8.3)::

  y, kept = dispatcher(x, expert_index, combine_weights, expert_params, *,
                       activation=jax.nn.gelu, capacity=None,
                       priority="k_major")

computing y_t = sum_j w_tj * kept_tj * FFN_{e_tj}(x_t), where
``FFN_e(x) = act(x W_i[e]) W_o[e]`` or, when ``expert_params`` has ``"wg"``,
the gated form ``(act(x W_g[e]) * x W_i[e]) W_o[e]`` (SwiGLU with silu).
``capacity=None`` is dropless; an int C drops assignments beyond C per expert
(``capacity.apply_capacity``), so every dispatcher drops the same tokens.

* ``loop_dispatch``: a per-expert loop over all tokens (MaxText's
  ``MoeLoopBlock``), the test oracle.
* ``einsum_dispatch``: GShard-style dense masks [T, E, C] and batched einsums;
  memory O(T E C).
* ``sorted_dispatch``: dropless; sort the T*k assignments by expert, two
  ``jax.lax.ragged_dot`` calls, unsort. The permutations have a custom VJP
  whose backward is a gather with the inverse permutation (MaxText
  ``_sort_activations``) rather than a scatter-add. Note: on XLA:CPU
  ``ragged_dot`` is lowered densely and is slow (ALGORITHMS.md §6.7).

``expert_params``: ``{"wi": [E, d, h], "wo": [E, h, d]}`` plus optional
``"wg": [E, d, h]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gradax.moe import capacity as capacity_lib


def _hidden_batched(params, xe, activation):
  """Expert hidden activations for expert-major inputs xe[E, C, d]."""
  h = jnp.einsum("ecd,edh->ech", xe, params["wi"])
  if "wg" in params:
    return activation(jnp.einsum("ecd,edh->ech", xe, params["wg"])) * h
  return activation(h)


def experts_batched(params, xe, activation=jax.nn.gelu):
  """Applies expert e to xe[e] for all e: [E, C, d] -> [E, C, d]."""
  return jnp.einsum("ech,ehd->ecd", _hidden_batched(params, xe, activation),
                    params["wo"])


def expert_ffn(params, e, x, activation=jax.nn.gelu):
  """Applies the single expert e to every row of x: [T, d] -> [T, d]."""
  h = x @ params["wi"][e]
  if "wg" in params:
    h = activation(x @ params["wg"][e]) * h
  else:
    h = activation(h)
  return h @ params["wo"][e]


def _validate(x, expert_index, combine_weights, params):
  if x.ndim != 2:
    raise ValueError(f"x must be [T, d]; got shape {x.shape}.")
  if expert_index.shape != combine_weights.shape or expert_index.ndim != 2:
    raise ValueError(
        f"expert_index {expert_index.shape} and combine_weights "
        f"{combine_weights.shape} must both be [T, k].")
  if params["wi"].shape[1] != x.shape[1]:
    raise ValueError(
        f"expert_params['wi'] has shape {params['wi'].shape}; its model width "
        f"must equal x's, {x.shape[1]}.")


def _capacity(expert_index, combine_weights, num_experts, capacity, priority):
  if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
    raise ValueError(f"capacity={capacity!r} must be None or an int >= 1.")
  return capacity_lib.apply_capacity(expert_index, combine_weights, num_experts,
                                     capacity, priority=priority)


@functools.partial(jax.jit, static_argnames=('activation', 'capacity', 'priority'))
def loop_dispatch(x, expert_index, combine_weights, expert_params, *,
                  activation=jax.nn.gelu, capacity=None, priority="k_major"):
  """Per-expert loop oracle: y = sum_e gate_e(x) * FFN_e(x) over all tokens.

  gate_e(x_t) = sum_j w_tj [e_tj = e] (after capacity drops). Costs E full
  FFNs; used as the reference every other path must match.

  Args:
    x: [T, d] tokens.
    expert_index: [T, k] int expert ids, -1 for none.
    combine_weights: [T, k] gates.
    expert_params: dict with "wi" [E, d, h], "wo" [E, h, d], optional "wg".
    activation: the expert nonlinearity.
    capacity: per-expert capacity C, or None (dropless).
    priority: capacity priority (see ``capacity``).

  Returns:
    ``(y [T, d], kept [T, k] bool)``.
  """
  _validate(x, expert_index, combine_weights, expert_params)
  e = expert_params["wi"].shape[0]
  idx, w, kept, _ = _capacity(expert_index, combine_weights, e, capacity,
                              priority)
  y = jnp.zeros(x.shape, jnp.float32)
  for i in range(e):
    gate = jnp.sum(jnp.where(idx == i, w, 0.0), axis=-1)
    y = y + gate[:, None] * expert_ffn(expert_params, i, x, activation)
  return y.astype(x.dtype), kept


def einsum_masks(expert_index, combine_weights, kept, positions, num_experts,
                 capacity):
  """GShard dispatch and combine masks, both [T, E, C].

  ``dispatch[t, e, c] = 1`` iff assignment (t, j) went to slot c of expert e;
  ``combine = gate * dispatch`` (float32).
  """
  oe = jax.nn.one_hot(jnp.where(kept, expert_index, -1), num_experts,
                      dtype=jnp.float32)                          # [T, k, E]
  oc = jax.nn.one_hot(jnp.where(kept, positions, -1), capacity,
                      dtype=jnp.float32)                          # [T, k, C]
  dispatch = jnp.einsum("tke,tkc->tec", oe, oc)
  combine = jnp.einsum("tke,tkc->tec", oe * combine_weights[..., None], oc)
  return dispatch, combine


@functools.partial(jax.jit, static_argnames=('activation', 'capacity', 'priority'))
def einsum_dispatch(x, expert_index, combine_weights, expert_params, *,
                    activation=jax.nn.gelu, capacity=None, priority="k_major"):
  """GShard-style dense einsum dispatch with capacity.

  ``xe = einsum('td,tec->ecd', x, dispatch)``, experts as batched einsums,
  ``y = einsum('ecd,tec->td', ye, combine)``. ``capacity=None`` uses C = T,
  which drops nothing (a token's experts are distinct) and must match the
  oracle exactly. Otherwise C is usually ceil(CF * T * k / E).

  Args and Returns: as ``loop_dispatch``.
  """
  _validate(x, expert_index, combine_weights, expert_params)
  e = expert_params["wi"].shape[0]
  c = x.shape[0] if capacity is None else capacity
  idx, w, kept, pos = _capacity(expert_index, combine_weights, e, c, priority)
  dispatch, combine = einsum_masks(idx, w, kept, pos, e, c)
  xe = jnp.einsum("td,tec->ecd", x, dispatch.astype(x.dtype))
  ye = experts_batched(expert_params, xe, activation)
  y = jnp.einsum("ecd,tec->td", ye.astype(jnp.float32), combine)
  return y.astype(x.dtype), kept


@jax.custom_vjp
def permute(x, perm, inv_perm):
  """``x[perm]`` whose backward is the gather ``g[inv_perm]`` (no scatter-add).

  ``inv_perm`` must be the inverse permutation, ``argsort(perm)``.
  """
  del inv_perm
  return x[perm]


def _permute_fwd(x, perm, inv_perm):
  return x[perm], (perm, inv_perm)


def _permute_bwd(res, g):
  perm, inv_perm = res
  return g[inv_perm], None, None


permute.defvjp(_permute_fwd, _permute_bwd)


def sorted_experts(x, expert_index, combine_weights, kept, expert_params,
                   activation=jax.nn.gelu):
  """The sorted-ragged core: y_t = sum_j w_tj kept_tj FFN_{e_tj}(x_t).

  Assignments with ``kept=False`` (or index outside [0, E)) sort to the tail,
  beyond ``sum(group_sizes)``, where ``ragged_dot`` writes zeros; the ring of
  experts relies on this to skip non-local experts.
  """
  t, k = expert_index.shape
  e = expert_params["wi"].shape[0]
  valid = kept & (expert_index >= 0) & (expert_index < e)
  flat = jnp.where(valid, expert_index, e).reshape(-1).astype(jnp.int32)
  perm = jnp.argsort(flat, stable=True)
  inv_perm = jnp.argsort(perm)
  group_sizes = jnp.sum(jax.nn.one_hot(flat, e, dtype=jnp.int32), axis=0)
  xs = permute(jnp.repeat(x, k, axis=0), perm, inv_perm)
  h = jax.lax.ragged_dot(xs, expert_params["wi"], group_sizes)
  if "wg" in expert_params:
    h = activation(jax.lax.ragged_dot(xs, expert_params["wg"], group_sizes)) * h
  else:
    h = activation(h)
  ys = jax.lax.ragged_dot(h, expert_params["wo"], group_sizes)
  ys = permute(ys, inv_perm, perm).reshape(t, k, -1)
  w = jnp.where(valid, combine_weights, 0.0).astype(jnp.float32)
  return jnp.einsum("tkd,tk->td", ys.astype(jnp.float32), w).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=('activation', 'capacity', 'priority'))
def sorted_dispatch(x, expert_index, combine_weights, expert_params, *,
                    activation=jax.nn.gelu, capacity=None, priority="k_major"):
  """Dropless sorted dispatch with ``jax.lax.ragged_dot`` (MegaBlocks style).

  1. stable ``argsort`` of the flat expert ids; 2. ``repeat(x, k)`` and
  permute; 3. group sizes by counting; 4. two ``ragged_dot``s (three when
  gated); 5. unsort and weight-sum over k. With ``capacity`` set, assignments
  beyond ceil-capacity are dropped first (same rule as the other paths).

  Args and Returns: as ``loop_dispatch``.
  """
  _validate(x, expert_index, combine_weights, expert_params)
  e = expert_params["wi"].shape[0]
  idx, w, kept, _ = _capacity(expert_index, combine_weights, e, capacity,
                              priority)
  return sorted_experts(x, idx, w, kept, expert_params, activation), kept


DISPATCHERS = {
    "loop": loop_dispatch,
    "einsum": einsum_dispatch,
    "sorted": sorted_dispatch,
}


def get_dispatcher(name):
  """Returns the dispatcher called ``name`` ("loop", "einsum" or "sorted")."""
  if name not in DISPATCHERS:
    raise ValueError(
        f"dispatch={name!r} is unknown; allowed: {tuple(DISPATCHERS)}.")
  return DISPATCHERS[name]
