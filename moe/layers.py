"""Flax nnx MoE layers: ``MoE`` (routed + shared + zero-computation experts,
DS-MoE) and ``PEER`` (product-key retrieval over many singleton experts).

The layers are thin: routing, capacity, dispatch and losses are the pure
functions of ``gradax.moe``. Both layers return ``(y, aux)`` explicitly, with
aux losses and metrics in float32 (ALGORITHMS.md §5.14); ``aux["loss"]`` is
the weighted sum to add to the task loss. ``layer.eval()`` switches to
inference behaviour (eval capacity factor, capacity-aware overflow handling,
DS-MoE sparse inference, running BatchNorm statistics in PEER).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gradax.moe import capacity as capacity_lib
from gradax.moe import dispatch as dispatch_lib
from gradax.moe import losses
from gradax.moe import routing as routing_lib

ROUTERS = ("top_k", "switch", "gshard", "expert_choice", "m6t", "hash")
OVERFLOW_POLICIES = (None, "drop", "reroute")

def _uniform_init(key, shape, fan_in, dtype=jnp.float32):
  """LeCun-uniform: U(-sqrt(3/fan_in), sqrt(3/fan_in)), variance 1/fan_in.

  Drawn as one power-of-two-long vector and sliced, so layers of many shapes
  share a handful of compiled RNG programs (each costs ~0.5 s of XLA:CPU
  compile; truncated normals cost several seconds).
  """
  n = math.prod(shape)
  size = 1 << max(n - 1, 1).bit_length()
  u = jax.random.uniform(key, (size,), jnp.float32, -1.0, 1.0)[:n]
  return (u.reshape(shape) * math.sqrt(3.0 / fan_in)).astype(dtype)


def _expert_init(key, shape):
  return _uniform_init(key, shape, shape[-2])


def _dense_init(key, shape, dtype=jnp.float32):
  return _uniform_init(key, shape, shape[-2], dtype)


def _check_positive_int(name, value, minimum=1):
  if not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r} is invalid: it must be an int >= "
                     f"{minimum}.")


class MoE(nnx.Module):
  """Mixture-of-experts feed-forward layer with top-k routing.

  .. math::

    y(x) = \\sum_{j \\in \\mathrm{TopK}(p(x))} w_j(x)\\, E_j(x)
           + \\sum_{s} \\mathrm{Shared}_s(x),\\quad p = \\mathrm{softmax}(x W_r)

  Routed experts ``E_j`` are FFNs; MoE++ adds zero-computation experts to the
  routing pool (Jin et al., ICLR 2025, arXiv 2410.07348): **zero** E(x) = 0,
  **copy** E(x) = x, **constant** E(x) = a1 x + a2 v with [a1, a2] =
  softmax(W_c x) and a trainable v. Their assignments never occupy capacity,
  and the balance loss weighs them by ``zc_balance_weight`` (tau).
  **Gating residuals**: logits += prev_logits @ W_g (pass the previous layer's
  ``aux["router_logits"]`` as ``prev_router_logits``). **Shared experts**
  (DeepSeekMoE, arXiv 2401.06066) are a dense FFN of width
  ``num_shared_experts * hidden_dim`` every token uses. **DS-MoE** (arXiv
  2404.05567, ``dense_training=True``): in training every expert runs,
  weighted by the full softmax, with the mutual-information loss; after
  ``.eval()`` only the top-k run (weights are their probabilities).

  Capacity: C = ceil(CF * T * k / E) over the T tokens of the call (E routed
  FFN experts); ``capacity_factor=None`` is dropless. At eval,
  ``eval_capacity_factor`` applies and ``inference_overflow`` chooses how
  overflow is handled: None (the training priority), "drop" (each expert
  keeps its highest-gate tokens) or "reroute" (overflow moves to the
  next-best expert with room), after He et al., arXiv 2503.05066.

  Args:
    d_model: model width d.
    hidden_dim: expert hidden width h.
    num_experts: routed FFN experts E.
    k: experts per token (for "m6t": the number of prototypes).
    rngs: ``nnx.Rngs`` for the initialisers.
    router: one of ``"top_k", "switch", "gshard", "expert_choice", "m6t",
      "hash"``.
    softmax_order: ``"softmax_topk"`` or ``"topk_softmax"`` (router "top_k").
    renormalize: renormalise the top-k weights (router "top_k").
    capacity_factor: training CF > 0, or None (dropless). For
      "expert_choice" it is the mean experts per token c (default 2).
    eval_capacity_factor: CF after ``.eval()``; defaults to capacity_factor.
    capacity_multiple_of: round C up to this multiple.
    priority: ``"k_major"`` or ``"batch_prioritized"``.
    inference_overflow: None, ``"drop"`` or ``"reroute"`` (eval only).
    dispatch: ``"sorted"`` (ragged_dot), ``"einsum"`` or ``"loop"``.
    activation: expert nonlinearity.
    gated: use gated experts (act(x W_g) * x W_i) W_o, e.g. SwiGLU with silu.
    num_shared_experts: shared experts (0 = none).
    zero_experts, copy_experts, constant_experts: MoE++ ZC experts.
    zc_balance_weight: tau, the balance-loss weight of ZC experts.
    gating_residual: add W_g prev_router_logits to the logits.
    dense_training: DS-MoE dense training / sparse inference.
    jitter_eps: multiplicative router-input jitter (needs ``rng`` at call).
    load_balancing_weight, z_loss_weight, mi_loss_weight: aux-loss weights.

  Example:
    >>> layer = MoE(16, 32, num_experts=4, k=2, rngs=nnx.Rngs(0))
    >>> y, aux = layer(jnp.ones((2, 5, 16)))
    >>> y.shape, aux["loss"].shape
    ((2, 5, 16), ())
  """

  def __init__(self, d_model, hidden_dim, num_experts, k=2, *, rngs,
               router="top_k", softmax_order="softmax_topk", renormalize=False,
               capacity_factor=None, eval_capacity_factor=None,
               capacity_multiple_of=1, priority="k_major",
               inference_overflow=None, dispatch="sorted",
               activation=jax.nn.gelu, gated=False, num_shared_experts=0,
               zero_experts=0, copy_experts=0, constant_experts=0,
               zc_balance_weight=1.0, gating_residual=False,
               dense_training=False, jitter_eps=0.0,
               load_balancing_weight=1e-2, z_loss_weight=1e-3,
               mi_loss_weight=1e-2):
    _check_positive_int("d_model", d_model)
    _check_positive_int("hidden_dim", hidden_dim)
    _check_positive_int("num_experts", num_experts)
    for name, v in (("num_shared_experts", num_shared_experts),
                    ("zero_experts", zero_experts),
                    ("copy_experts", copy_experts),
                    ("constant_experts", constant_experts)):
      _check_positive_int(name, v, minimum=0)
    if router not in ROUTERS:
      raise ValueError(f"router={router!r} is unknown; allowed: {ROUTERS}.")
    if softmax_order not in routing_lib.SOFTMAX_ORDERS:
      raise ValueError(f"softmax_order={softmax_order!r} is invalid; allowed: "
                       f"{routing_lib.SOFTMAX_ORDERS}.")
    if priority not in ("k_major", "batch_prioritized"):
      raise ValueError(f"priority={priority!r} is invalid; allowed: "
                       "'k_major', 'batch_prioritized'.")
    if inference_overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"inference_overflow={inference_overflow!r} is invalid;"
                       f" allowed: {OVERFLOW_POLICIES}.")
    dispatch_lib.get_dispatcher(dispatch)
    capacity_lib.check_capacity_factor(capacity_factor)
    capacity_lib.check_capacity_factor(eval_capacity_factor,
                                       "eval_capacity_factor")
    n_zc = zero_experts + copy_experts + constant_experts
    total = num_experts + n_zc
    if router == "switch" and k != 1:
      raise ValueError(f"k={k} is invalid for router='switch'; it must be 1.")
    if router == "gshard" and k != 2:
      raise ValueError(f"k={k} is invalid for router='gshard'; it must be 2.")
    if router == "hash" and k != 1:
      raise ValueError(f"k={k} is invalid for router='hash'; it must be 1.")
    routing_lib.check_k(k, total)
    if router == "m6t" and total % k:
      raise ValueError(f"num_experts={total} (including zero-computation "
                       f"experts) is not divisible by k={k} for router='m6t'.")
    if dense_training and (n_zc or router != "top_k"):
      raise ValueError("dense_training=True needs router='top_k' and no "
                       "zero-computation experts.")
    if router == "expert_choice" and n_zc:
      raise ValueError("router='expert_choice' does not support "
                       "zero-computation experts.")

    self.d_model, self.hidden_dim = d_model, hidden_dim
    self.num_experts, self.k, self.total_experts = num_experts, k, total
    self.router, self.softmax_order = router, softmax_order
    self.renormalize = renormalize
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                 else eval_capacity_factor)
    self.capacity_multiple_of, self.priority = capacity_multiple_of, priority
    self.inference_overflow, self.dispatch = inference_overflow, dispatch
    self.activation, self.gated = activation, gated
    self.zero_experts, self.copy_experts = zero_experts, copy_experts
    self.constant_experts = constant_experts
    self.zc_balance_weight = zc_balance_weight
    self.gating_residual, self.dense_training = gating_residual, dense_training
    self.jitter_eps = jitter_eps
    self.load_balancing_weight = load_balancing_weight
    self.z_loss_weight, self.mi_loss_weight = z_loss_weight, mi_loss_weight
    self.deterministic = False

    init = _dense_init
    self.router_weight = nnx.Param(init(rngs.params(), (d_model, total)))
    if gating_residual:
      self.gate_residual = nnx.Param(jnp.zeros((total, total)))
    e, d, h = num_experts, d_model, hidden_dim
    self.wi = nnx.Param(_expert_init(rngs.params(), (e, d, h)))
    self.wo = nnx.Param(_expert_init(rngs.params(), (e, h, d)))
    if gated:
      self.wg = nnx.Param(_expert_init(rngs.params(), (e, d, h)))
    if num_shared_experts:
      hs = num_shared_experts * hidden_dim
      self.shared_wi = nnx.Param(init(rngs.params(), (d, hs)))
      self.shared_wo = nnx.Param(init(rngs.params(), (hs, d)))
      if gated:
        self.shared_wg = nnx.Param(init(rngs.params(), (d, hs)))
    if constant_experts:
      self.constant_gate = nnx.Param(
          init(rngs.params(), (constant_experts, d, 2)))
      self.constant_value = nnx.Param(
          _uniform_init(rngs.params(), (constant_experts, d), 2500.0))

  def expert_params(self):
    """The routed experts as the dict the dispatchers take."""
    p = {"wi": self.wi[...], "wo": self.wo[...]}
    if self.gated:
      p["wg"] = self.wg[...]
    return p

  def _route(self, logits, token_ids, rng):
    if self.dense_training and self.deterministic:
      return routing_lib.top_k_routing(logits, self.k)
    if self.router == "top_k":
      return routing_lib.top_k_routing(logits, self.k, order=self.softmax_order,
                                       renormalize=self.renormalize)
    if self.router == "switch":
      return routing_lib.switch_routing(logits)
    if self.router == "gshard":
      return routing_lib.gshard_top2_routing(
          logits, rng=None if self.deterministic else rng)
    if self.router == "expert_choice":
      cf = self.eval_capacity_factor if self.deterministic else (
          self.capacity_factor)
      return routing_lib.expert_choice_routing(
          logits, capacity_factor=2.0 if cf is None else cf)
    if self.router == "m6t":
      return routing_lib.m6t_routing(logits, self.k)
    if token_ids is None:
      raise ValueError("router='hash' needs token_ids at call time; got None.")
    return routing_lib.hash_routing(token_ids.reshape(-1), self.total_experts)

  def _dense_all_experts(self, x, probs):
    """DS-MoE dense training: sum over all experts weighted by probs."""
    p = self.expert_params()
    xe = jnp.broadcast_to(x, (self.num_experts,) + x.shape)
    ye = dispatch_lib.experts_batched(p, xe, self.activation)   # [E, T, d]
    return jnp.einsum("etd,te->td", ye.astype(jnp.float32), probs)

  def _zero_computation(self, x, idx, w):
    """Outputs of the copy and constant experts (zero experts add nothing)."""
    y = jnp.zeros(x.shape, jnp.float32)
    first = self.num_experts + self.zero_experts
    is_copy = (idx >= first) & (idx < first + self.copy_experts)
    y = y + jnp.sum(jnp.where(is_copy, w, 0.0), -1)[:, None] * x
    first += self.copy_experts
    for c in range(self.constant_experts):
      gate = jnp.sum(jnp.where(idx == first + c, w, 0.0), -1)[:, None]
      a = jax.nn.softmax(x.astype(jnp.float32) @ self.constant_gate[c], -1)
      y = y + gate * (a[:, :1] * x + a[:, 1:] * self.constant_value[c])
    return y

  def __call__(self, x, *, prev_router_logits=None, token_ids=None, rng=None):
    """Applies the layer to x[..., d].

    Args:
      x: [..., d] tokens; all leading axes form one routing group.
      prev_router_logits: the previous MoE++ layer's ``aux["router_logits"]``
        (used when ``gating_residual``).
      token_ids: [...] int ids, needed by ``router="hash"``.
      rng: PRNG key for jitter and GShard's random second expert (training).

    Returns:
      ``(y, aux)``: y has x's shape and dtype; aux holds ``loss`` (weighted
      aux losses), ``load_balancing_loss``, ``router_z_loss``,
      ``router_logits`` [T, E_total] and the routing metrics.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    train = not self.deterministic
    jitter_rng = None
    if train and self.jitter_eps > 0:
      if rng is None:
        raise ValueError("jitter_eps > 0 needs rng=<PRNG key> in training.")
      rng, jitter_rng = jax.random.split(rng)
    logits = routing_lib.router_logits(
        x2, self.router_weight[...],
        jitter_eps=self.jitter_eps if train else 0.0, rng=jitter_rng)
    if self.gating_residual and prev_router_logits is not None:
      logits = logits + prev_router_logits.reshape(logits.shape).astype(
          jnp.float32) @ self.gate_residual[...]
    r = self._route(logits, token_ids, rng)
    idx, w = r.expert_index, r.combine_weights
    aux = {"router_z_loss": r.aux_losses["router_z_loss"],
           "router_logits": logits}

    if self.dense_training and train:
      y = self._dense_all_experts(x2, r.router_probs).astype(x.dtype)
      kept = idx >= 0
      mi = losses.mutual_information_loss(r.router_probs)
      aux["load_balancing_loss"] = r.aux_losses["load_balancing_loss"]
      aux["mutual_information_loss"] = mi
      aux["loss"] = self.mi_loss_weight * mi + (
          self.z_loss_weight * aux["router_z_loss"])
    else:
      is_ffn = (idx >= 0) & (idx < self.num_experts)
      ffn_idx = jnp.where(is_ffn, idx, -1)
      cf = self.eval_capacity_factor if self.deterministic else (
          self.capacity_factor)
      cap, priority = None, self.priority
      if cf is not None and self.router != "expert_choice":
        cap = capacity_lib.compute_capacity(
            x2.shape[0], self.num_experts, idx.shape[-1], cf,
            self.capacity_multiple_of)
      if self.deterministic and cap is not None:
        if self.inference_overflow == "drop":
          priority = "score"
        elif self.inference_overflow == "reroute":
          probs_ffn = r.router_probs[:, :self.num_experts]
          ffn_idx, rw, _ = capacity_lib.reroute_overflow(ffn_idx, w, probs_ffn,
                                                         cap)
          w = jnp.where(is_ffn, rw, w)
          cap = None
      y, kept_ffn = dispatch_lib.get_dispatcher(self.dispatch)(
          x2, ffn_idx, w, self.expert_params(), activation=self.activation,
          capacity=cap, priority=priority)
      kept = kept_ffn | ((idx >= self.num_experts))
      idx = jnp.where(is_ffn, ffn_idx, idx)
      if self.total_experts > self.num_experts:
        y = (y.astype(jnp.float32) + self._zero_computation(x2, idx, w)).astype(
            x.dtype)
      eta = None
      if self.total_experts > self.num_experts:
        eta = jnp.concatenate([
            jnp.ones((self.num_experts,)),
            jnp.full((self.total_experts - self.num_experts,),
                     self.zc_balance_weight)])
      lb = losses.load_balancing_loss(r.router_probs, r.expert_index,
                                      expert_weights=eta)
      aux["load_balancing_loss"] = lb
      aux["loss"] = self.load_balancing_weight * lb + (
          self.z_loss_weight * aux["router_z_loss"])

    if hasattr(self, "shared_wi"):
      h = x2 @ self.shared_wi[...]
      if self.gated:
        h = self.activation(x2 @ self.shared_wg[...]) * h
      else:
        h = self.activation(h)
      y = y + (h @ self.shared_wo[...]).astype(y.dtype)
    aux.update(losses.routing_metrics(r.router_probs, idx, kept=kept))
    return y.reshape(shape), aux


def product_key_topk(query, keys_a, keys_b, k):
  """Product-key top-k retrieval (Lample et al. 2019; PEER, arXiv 2407.04153).

  The N = n_a * n_b keys are all concatenations [a_i; b_j]. With q = [q_a; q_b]
  the score is q_a . a_i + q_b . b_j, so the top-k over all N keys lies among
  the k x k pairs of the per-half top-k: cost O((sqrt N + k^2) d) not O(N d).

  Args:
    query: [..., d_k] queries (d_k even).
    keys_a: [n_a, d_k / 2] first-half sub-keys.
    keys_b: [n_b, d_k / 2] second-half sub-keys.
    k: results per query, k <= min(n_a, n_b).

  Returns:
    ``(scores [..., k], indices [..., k])`` in descending score order, with
    index ``i * n_b + j`` for the key [a_i; b_j].
  """
  half = keys_a.shape[-1]
  if query.shape[-1] != 2 * half or keys_b.shape[-1] != half:
    raise ValueError(f"query width {query.shape[-1]} must be twice the "
                     f"sub-key widths {keys_a.shape[-1]}, {keys_b.shape[-1]}.")
  if not 1 <= k <= min(keys_a.shape[0], keys_b.shape[0]):
    raise ValueError(f"k={k} must satisfy 1 <= k <= sqrt(num_experts) = "
                     f"{min(keys_a.shape[0], keys_b.shape[0])}.")
  sa, ia = jax.lax.top_k(query[..., :half] @ keys_a.T, k)
  sb, ib = jax.lax.top_k(query[..., half:] @ keys_b.T, k)
  cand = (sa[..., :, None] + sb[..., None, :]).reshape(sa.shape[:-1] + (k * k,))
  scores, flat = jax.lax.top_k(cand, k)
  i = jnp.take_along_axis(ia, flat // k, axis=-1)
  j = jnp.take_along_axis(ib, flat % k, axis=-1)
  return scores, i * keys_b.shape[0] + j


class PEER(nnx.Module):
  """PEER: product-key retrieval over N singleton-MLP experts.

  .. math::

    f(x) = \\sum_{h=1}^{H} \\sum_{i \\in I_h(x)} g_{h,i}(x)\\,
           \\sigma(u_i^\\top x)\\, v_i,
    \\qquad g_h = \\mathrm{softmax}(\\text{top-}k\\ \\text{scores})

  Each head h has a query network q_h(x) = BatchNorm(W_q x) and its own
  product keys; all heads share the N = n^2 experts (u_i, v_i). He, "Mixture
  of A Million Experts", 2024, arXiv 2407.04153.

  Args:
    d_model: model width d.
    num_experts: N, a perfect square.
    k: experts retrieved per head, k <= sqrt(N).
    num_heads: H query heads.
    d_key: query width (even); defaults to d rounded up to an even number.
    rngs: ``nnx.Rngs``.
    activation: sigma.
    query_batchnorm: BatchNorm on the queries (the paper's setting).

  Example:
    >>> layer = PEER(16, num_experts=64, k=4, num_heads=2, rngs=nnx.Rngs(0))
    >>> y, aux = layer(jnp.ones((3, 16)))
  """

  def __init__(self, d_model, num_experts, k=16, num_heads=8, d_key=None, *,
               rngs, activation=jax.nn.relu, query_batchnorm=True):
    _check_positive_int("d_model", d_model)
    _check_positive_int("num_experts", num_experts)
    _check_positive_int("num_heads", num_heads)
    n = math.isqrt(num_experts)
    if n * n != num_experts:
      raise ValueError(f"num_experts={num_experts} must be a perfect square "
                       "(product keys use sqrt(N) sub-keys per half).")
    if not isinstance(k, int) or not 1 <= k <= n:
      raise ValueError(f"k={k!r} is invalid: need 1 <= k <= sqrt(num_experts)"
                       f" = {n}.")
    d_key = d_key if d_key is not None else d_model + d_model % 2
    if not isinstance(d_key, int) or d_key < 2 or d_key % 2:
      raise ValueError(f"d_key={d_key!r} must be an even int >= 2.")
    self.num_experts, self.k, self.num_heads = num_experts, k, num_heads
    self.d_key, self.activation = d_key, activation
    self.query = nnx.Linear(d_model, num_heads * d_key, use_bias=False,
                            kernel_init=_dense_init, rngs=rngs)
    self.query_norm = (nnx.BatchNorm(num_heads * d_key, rngs=rngs)
                       if query_batchnorm else None)
    self.sub_keys = nnx.Param(_uniform_init(
        rngs.params(), (num_heads, 2, n, d_key // 2), d_key))
    self.down = nnx.Param(_uniform_init(rngs.params(), (num_experts, d_model),
                                        d_model))
    self.up = nnx.Param(_uniform_init(rngs.params(), (num_experts, d_model),
                                      num_heads * k))

  def retrieve(self, x):
    """Top-k (scores, expert indices) per head: each [T, H, k]."""
    q = self.query(x)
    if self.query_norm is not None:
      q = self.query_norm(q)
    q = q.reshape(x.shape[0], self.num_heads, self.d_key)
    keys = self.sub_keys[...]
    return jax.vmap(product_key_topk, in_axes=(1, 0, 0, None), out_axes=1)(
        q, keys[:, 0], keys[:, 1], self.k)

  def __call__(self, x):
    """Applies PEER to x[..., d]; returns ``(y, aux)`` (aux["loss"] = 0)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    scores, idx = self.retrieve(x2)
    g = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    u = jnp.take(self.down[...], idx, axis=0)                  # [T, H, k, d]
    v = jnp.take(self.up[...], idx, axis=0)
    a = self.activation(jnp.einsum("td,thkd->thk", x2, u)) * g
    y = jnp.einsum("thk,thkd->td", a.astype(x2.dtype), v)
    usage = jnp.zeros((self.num_experts,)).at[idx.reshape(-1)].add(1.0)
    aux = {"loss": jnp.float32(0.0),
           "fraction_experts_used": jnp.mean((usage > 0).astype(jnp.float32))}
    return y.reshape(shape), aux
