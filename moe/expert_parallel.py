"""Expert parallelism: ``shard_map`` strategies over an ``expert`` mesh axis.

Tokens are sharded over ``(data_axis, expert_axis)`` (the expert axis doubles
as a data axis for tokens), the E experts over ``expert_axis`` (E / n per
device) and, optionally, the expert hidden width over ``model_axis`` (tensor
parallelism inside each expert, one psum over ``model``). The router weight is
replicated. Both strategies run on XLA:CPU (ALGORITHMS.md §5.5):

* ``"all_to_all"`` — capacity-padded: local routing and GShard masks, an
  ``all_to_all`` sends each expert its [C, d] slots from every device, local
  experts run, a second ``all_to_all`` returns the results, local combine.
  Forward: exactly 2 all-to-alls. Capacity C = ceil(CF * T_local * k / E) per
  device group (``capacity_factor=None``: C = T_local, nothing dropped).
* ``"ring"`` — dropless ring of experts (MaxText ``roe_ag_and_route``):
  ``all_gather`` the tokens, route locally, run the local experts with
  ``ragged_dot`` (non-local assignments sort to the tail, where ragged_dot
  writes zeros), then ``psum_scatter`` the partial outputs. Forward: 1
  all-gather + 1 reduce-scatter.

``lax.ragged_all_to_all`` is not implemented on XLA:CPU (§6.8) and is not used.

Aux losses and metrics are computed over the global batch (psums over the
token axes), so they equal the single-device values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gradax.moe import capacity as capacity_lib
from gradax.moe import dispatch as dispatch_lib
from gradax.moe import losses
from gradax.moe import routing as routing_lib

STRATEGIES = ("all_to_all", "ring")

# Logical axes of the expert parameters (MaxText naming).
LOGICAL_AXES = {
    "wi": ("expert", "embed", "mlp"),
    "wg": ("expert", "embed", "mlp"),
    "wo": ("expert", "mlp", "embed"),
    "router": ("embed", None),
    "tokens": ("batch", "embed"),
}


def sharding_rules(expert_axis="expert", data_axis=None, model_axis=None):
  """Logical-axis -> mesh-axis rules combining the expert, data, model axes.

  expert -> ``expert_axis``; mlp -> ``model_axis``; embed -> replicated;
  batch (tokens) -> ``(data_axis, expert_axis)``.

  Returns:
    dict from logical axis name to a mesh axis, a tuple of them, or None.

  Example:
    >>> sharding_rules("expert", "data", "model")["batch"]
    ('data', 'expert')
  """
  batch = tuple(a for a in (data_axis, expert_axis) if a is not None)
  return {"expert": expert_axis, "mlp": model_axis, "embed": None,
          "batch": batch if len(batch) > 1 else (batch[0] if batch else None),
          None: None}


def logical_to_spec(logical, rules):
  """PartitionSpec for a tuple of logical axis names under ``rules``."""
  return P(*(rules[a] for a in logical))


def param_specs(rules, gated=False):
  """PartitionSpecs of ``{"wi", "wo"[, "wg"]}`` under ``rules``."""
  names = ("wi", "wo", "wg") if gated else ("wi", "wo")
  return {n: logical_to_spec(LOGICAL_AXES[n], rules) for n in names}


def shard_inputs(mesh, x, router_weight, expert_params, *,
                 expert_axis="expert", data_axis=None, model_axis=None):
  """``device_put`` of tokens, router and experts onto their shardings."""
  rules = sharding_rules(expert_axis, data_axis, model_axis)
  specs = param_specs(rules, "wg" in expert_params)
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
  return (put(x, logical_to_spec(LOGICAL_AXES["tokens"], rules)),
          put(router_weight, P()),
          {n: put(v, specs[n]) for n, v in expert_params.items()})


def _axes(*names):
  names = tuple(n for n in names if n is not None)
  return names if names else None


def _validate(mesh, x, router_weight, expert_params, k, capacity_factor,
              strategy, expert_axis, data_axis, model_axis):
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is unknown; allowed: {STRATEGIES}.")
  for a in (expert_axis, data_axis, model_axis):
    if a is not None and a not in mesh.shape:
      raise ValueError(f"mesh axis {a!r} is not in the mesh axes "
                       f"{tuple(mesh.shape)}.")
  e = expert_params["wi"].shape[0]
  if router_weight.shape[-1] != e:
    raise ValueError(f"router_weight has {router_weight.shape[-1]} outputs but "
                     f"there are num_experts={e} experts.")
  routing_lib.check_k(k, e)
  capacity_lib.check_capacity_factor(capacity_factor)
  n = mesh.shape[expert_axis]
  if e % n:
    raise ValueError(
        f"num_experts={e} is not divisible by the {expert_axis!r} mesh axis "
        f"of size {n}; each device must hold the same number of experts.")
  shards = n * (mesh.shape[data_axis] if data_axis else 1)
  if x.shape[0] % shards:
    raise ValueError(f"the token count {x.shape[0]} is not divisible by the "
                     f"{shards} token shards over ({data_axis}, {expert_axis}).")
  if model_axis is not None and expert_params["wi"].shape[-1] % (
      mesh.shape[model_axis]):
    raise ValueError(f"hidden_dim={expert_params['wi'].shape[-1]} is not "
                     f"divisible by the {model_axis!r} axis of size "
                     f"{mesh.shape[model_axis]}.")


def _aux(r, kept, axis_name):
  aux = {"load_balancing_loss": losses.load_balancing_loss(
             r.router_probs, r.expert_index, axis_name=axis_name),
         "router_z_loss": losses.router_z_loss(r.router_logits,
                                               axis_name=axis_name)}
  aux.update(losses.routing_metrics(r.router_probs, r.expert_index, kept=kept,
                                    axis_name=axis_name))
  return aux


def expert_parallel_moe(x, router_weight, expert_params, *, mesh, k=2,
                        strategy="all_to_all", capacity_factor=None,
                        order="softmax_topk", renormalize=False,
                        activation=jax.nn.gelu, priority="k_major",
                        expert_axis="expert", data_axis=None, model_axis=None):
  """Top-k MoE feed-forward with expert parallelism under ``shard_map``.

  y_t = sum_{j in top-k} w_tj FFN_{e_tj}(x_t), computed with the experts
  sharded over ``expert_axis``. "all_to_all" is capacity-padded with
  C = ceil(CF * T_local * k / E) per device group (None: C = T_local, no
  drops); "ring" is dropless and ignores ``capacity_factor``.

  Args:
    x: [T, d] tokens, sharded (or placed by ``shard_inputs``) over
      ``(data_axis, expert_axis)``.
    router_weight: [d, E], replicated.
    expert_params: ``{"wi": [E, d, h], "wo": [E, h, d]}`` (+ ``"wg"``),
      sharded over ``expert_axis`` (and h over ``model_axis``).
    mesh: a mesh containing the named axes (``gradax.distributed.make_mesh``).
    k: experts per token.
    strategy: ``"all_to_all"`` or ``"ring"``.
    capacity_factor: CF > 0 or None.
    order, renormalize: top-k routing options (``routing.top_k_routing``).
    activation: expert nonlinearity.
    priority: capacity priority for "all_to_all".
    expert_axis, data_axis, model_axis: mesh axis names (the last two
      optional).

  Returns:
    ``(y [T, d], aux)`` with global-batch ``load_balancing_loss``,
    ``router_z_loss`` and routing metrics.

  Raises:
    ValueError: for an unknown strategy, k > E, CF <= 0, or E not divisible
      by the expert axis size.

  Example:
    >>> mesh = gradax.distributed.make_mesh("expert=8")
    >>> xs, wr, ps = shard_inputs(mesh, x, wr, params)
    >>> y, aux = expert_parallel_moe(xs, wr, ps, mesh=mesh, k=2)
  """
  _validate(mesh, x, router_weight, expert_params, k, capacity_factor,
            strategy, expert_axis, data_axis, model_axis)
  rules = sharding_rules(expert_axis, data_axis, model_axis)
  token_spec = logical_to_spec(LOGICAL_AXES["tokens"], rules)
  specs = param_specs(rules, "wg" in expert_params)
  e = expert_params["wi"].shape[0]
  token_axes = _axes(data_axis, expert_axis)
  x, router_weight, expert_params = shard_inputs(
      mesh, x, router_weight, expert_params, expert_axis=expert_axis,
      data_axis=data_axis, model_axis=model_axis)

  def route(xt, wr):
    logits = routing_lib.router_logits(xt, wr)
    return routing_lib.top_k_routing(logits, k, order=order,
                                     renormalize=renormalize)

  def a2a_body(xl, wr, p):
    t = xl.shape[0]
    r = route(xl, wr)
    c = t if capacity_factor is None else capacity_lib.compute_capacity(
        t, e, k, capacity_factor)
    idx, w, kept, pos = capacity_lib.apply_capacity(
        r.expert_index, r.combine_weights, e, c, priority=priority)
    dispatch, combine = dispatch_lib.einsum_masks(idx, w, kept, pos, e, c)
    xe = jnp.einsum("td,tec->ecd", xl, dispatch.astype(xl.dtype))
    xe = jax.lax.all_to_all(xe, expert_axis, 0, 1, tiled=True)  # [E/n, nC, d]
    ye = dispatch_lib.experts_batched(p, xe, activation)
    if model_axis is not None:
      ye = jax.lax.psum(ye, model_axis)
    ye = jax.lax.all_to_all(ye, expert_axis, 1, 0, tiled=True)  # [E, C, d]
    y = jnp.einsum("ecd,tec->td", ye.astype(jnp.float32), combine)
    return y.astype(xl.dtype), _aux(r, kept, token_axes)

  def ring_body(xl, wr, p):
    # A varying gather: an invariant one would transpose to a plain slice and
    # lose the other devices' contributions to dx.
    xg = jax.lax.all_gather(xl, expert_axis, tiled=True)
    r = route(xg, wr)
    e_local = p["wi"].shape[0]
    local = r.expert_index - jax.lax.axis_index(expert_axis) * e_local
    is_local = (local >= 0) & (local < e_local)
    part = dispatch_lib.sorted_experts(
        xg, jnp.where(is_local, local, -1), r.combine_weights, is_local, p,
        activation)
    if model_axis is not None:
      part = jax.lax.psum(part, model_axis)
    y = jax.lax.psum_scatter(part, expert_axis, scatter_dimension=0,
                             tiled=True)
    # Every device routed the same tokens; pmean marks the aux as replicated.
    aux = jax.tree.map(lambda v: jax.lax.pmean(v, expert_axis),
                       _aux(r, r.expert_index >= 0, data_axis))
    return y, aux

  body = a2a_body if strategy == "all_to_all" else ring_body
  f = jax.shard_map(body, mesh=mesh, in_specs=(token_spec, P(), specs),
                    out_specs=(token_spec, P()))
  return f(x, router_weight, expert_params)


def collective_bytes_per_token(strategy, *, num_tokens, d_model, num_experts,
                               k, axis_size, capacity_factor=None,
                               itemsize=4):
  """Analytic per-device wire bytes per local token for one forward pass.

  Ring model (ALGORITHMS.md §6.9), n = ``axis_size``, T_l = local tokens:

  * all_to_all: 2 all-to-alls of [E, C, d], each moving (n-1)/n of it;
    C = ceil(CF * T_l * k / E) (CF=None: C = T_l).
  * ring: all-gather to [n T_l, d] moves (n-1) T_l d; the reduce-scatter of
    [n T_l, d] moves (n-1) T_l d.

  Args:
    strategy: ``"all_to_all"`` or ``"ring"``.
    num_tokens: T_l, tokens per device.
    d_model, num_experts, k: layer sizes.
    axis_size: n, devices on the expert axis.
    capacity_factor: CF (all_to_all only).
    itemsize: bytes per activation element.

  Returns:
    Bytes sent per device divided by T_l.
  """
  n, t = axis_size, num_tokens
  if strategy == "all_to_all":
    c = t if capacity_factor is None else capacity_lib.compute_capacity(
        t, num_experts, k, capacity_factor)
    total = 2 * (n - 1) / n * num_experts * c * d_model * itemsize
  elif strategy == "ring":
    total = 2 * (n - 1) * t * d_model * itemsize
  else:
    raise ValueError(f"strategy={strategy!r} is unknown; allowed: {STRATEGIES}.")
  return total / t

