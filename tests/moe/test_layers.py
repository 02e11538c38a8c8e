"""The nnx layers: MoE glue, MoE++ experts, shared experts, DS-MoE, PEER."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gradax.moe import capacity, dispatch, layers, routing

D, H = 8, 12


def _x(seed, shape=(3, 4, D), positive=False):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return jnp.asarray(np.abs(x) + 0.1 if positive else x)


@pytest.mark.parametrize("name", ["sorted", "einsum", "loop"])
def test_moe_layer_equals_routing_plus_oracle(name):
  layer = layers.MoE(D, H, num_experts=4, k=2, dispatch=name,
                     capacity_factor=1.0, rngs=nnx.Rngs(0))
  x = _x(0)
  y, aux = layer(x)
  x2 = x.reshape(-1, D)
  r = routing.top_k_routing(x2 @ layer.router_weight[...], 2)
  cap = capacity.compute_capacity(12, 4, 2, 1.0)
  ref, kept = dispatch.loop_dispatch(x2, r.expert_index, r.combine_weights,
                                     layer.expert_params(), capacity=cap)
  np.testing.assert_allclose(y.reshape(-1, D), ref, atol=1e-5)
  np.testing.assert_allclose(aux["fraction_dropped"], 1 - kept.mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(
      aux["loss"], 1e-2 * r.aux_losses["load_balancing_loss"]
      + 1e-3 * r.aux_losses["router_z_loss"], rtol=1e-6)


def _force_expert(layer, expert):
  """Router weights that send every positive input to ``expert``."""
  w = np.zeros((D, layer.total_experts), np.float32)
  w[:, expert] = 10.0
  layer.router_weight[...] = jnp.asarray(w)


def test_moe_plus_plus_zero_expert_outputs_zeros_and_copy_is_identity():
  layer = layers.MoE(D, H, num_experts=2, k=1, softmax_order="topk_softmax",
                     zero_experts=1, copy_experts=1, constant_experts=1,
                     rngs=nnx.Rngs(1))
  x = _x(1, positive=True)
  _force_expert(layer, 2)                    # expert ids: 0,1 FFN; 2 zero
  y, aux = layer(x)
  np.testing.assert_array_equal(y, np.zeros_like(x))
  np.testing.assert_allclose(aux["expert_load"], [0, 0, 1, 0, 0])
  _force_expert(layer, 3)                    # 3 copy
  y, _ = layer(x)
  np.testing.assert_array_equal(y, x)
  _force_expert(layer, 4)                    # 4 constant: a1 x + a2 v
  y, _ = layer(x)
  a = jax.nn.softmax(x.reshape(-1, D) @ layer.constant_gate[0], -1)
  ref = a[:, :1] * x.reshape(-1, D) + a[:, 1:] * layer.constant_value[0]
  np.testing.assert_allclose(y.reshape(-1, D), ref, atol=1e-6)


def test_moe_plus_plus_gating_residual_and_heterogeneous_balance():
  layer = layers.MoE(D, H, num_experts=4, k=2, zero_experts=1, copy_experts=1,
                     gating_residual=True, zc_balance_weight=0.5,
                     rngs=nnx.Rngs(2))
  rng = np.random.default_rng(2)
  layer.gate_residual[...] = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
  x = _x(2)
  prev = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
  _, aux = layer(x, prev_router_logits=prev)
  x2 = x.reshape(-1, D)
  logits = x2 @ layer.router_weight[...] + prev @ layer.gate_residual[...]
  np.testing.assert_allclose(aux["router_logits"], logits, rtol=1e-5, atol=1e-5)
  r = routing.top_k_routing(logits, 2)
  idx, p = np.asarray(r.expert_index), np.asarray(r.router_probs)
  f = np.bincount(idx.reshape(-1), minlength=6) / idx.size
  eta = np.array([1, 1, 1, 1, 0.5, 0.5])
  np.testing.assert_allclose(aux["load_balancing_loss"],
                             6 * np.sum(eta * f * p.mean(0)), rtol=1e-5)


def test_shared_experts_add_a_dense_ffn():
  kw = dict(num_experts=4, k=2, rngs=nnx.Rngs(3))
  with_shared = layers.MoE(D, H, num_shared_experts=2, **kw)
  x = _x(3)
  y, _ = with_shared(x)
  x2 = x.reshape(-1, D)
  r = routing.top_k_routing(x2 @ with_shared.router_weight[...], 2)
  routed, _ = dispatch.loop_dispatch(x2, r.expert_index, r.combine_weights,
                                     with_shared.expert_params())
  shared = jax.nn.gelu(x2 @ with_shared.shared_wi[...]) @ with_shared.shared_wo[...]
  assert with_shared.shared_wi.shape == (D, 2 * H)
  np.testing.assert_allclose(y.reshape(-1, D), routed + shared, atol=1e-5)


def test_ds_moe_dense_training_sparse_inference():
  layer = layers.MoE(D, H, num_experts=4, k=1, dense_training=True,
                     rngs=nnx.Rngs(4))
  x = _x(4)
  x2 = x.reshape(-1, D)
  probs = jax.nn.softmax(x2 @ layer.router_weight[...], -1)
  y, aux = layer(x)
  dense = sum(probs[:, e:e + 1] * dispatch.expert_ffn(layer.expert_params(),
                                                      e, x2)
              for e in range(4))
  np.testing.assert_allclose(y.reshape(-1, D), dense, atol=1e-5)
  assert "mutual_information_loss" in aux
  layer.eval()
  y, _ = layer(x)
  top = jnp.argmax(probs, -1)
  sparse = jnp.stack([probs[t, top[t]] * dispatch.expert_ffn(
      layer.expert_params(), int(top[t]), x2[t:t + 1])[0] for t in range(12)])
  np.testing.assert_allclose(y.reshape(-1, D), sparse, atol=1e-5)


def test_eval_capacity_aware_drop_and_reroute():
  kw = dict(num_experts=4, k=2, capacity_factor=0.5, rngs=nnx.Rngs(5))
  x = _x(5, shape=(32, D))
  drop = layers.MoE(D, H, inference_overflow="drop", **kw)
  reroute = layers.MoE(D, H, inference_overflow="reroute", **kw)
  drop.eval()
  reroute.eval()
  y, aux = drop(x)
  r = routing.top_k_routing(x @ drop.router_weight[...], 2)
  cap = capacity.compute_capacity(32, 4, 2, 0.5)
  ref, kept = dispatch.loop_dispatch(x, r.expert_index, r.combine_weights,
                                     drop.expert_params(), capacity=cap,
                                     priority="score")
  np.testing.assert_allclose(y, ref, atol=1e-5)
  np.testing.assert_allclose(aux["fraction_dropped"], 1 - kept.mean(),
                             rtol=1e-6)
  _, aux_r = reroute(x)
  assert float(aux_r["fraction_dropped"]) < float(aux["fraction_dropped"])


@pytest.mark.parametrize("router", ["switch", "gshard", "expert_choice", "m6t",
                                    "hash"])
def test_every_router_runs_in_the_layer(router):
  k = {"switch": 1, "gshard": 2, "expert_choice": 2, "m6t": 2, "hash": 1}
  layer = layers.MoE(D, H, num_experts=4, k=k[router], router=router,
                     dispatch="einsum", rngs=nnx.Rngs(6))
  x = _x(6)
  y, aux = layer(x, token_ids=jnp.arange(12).reshape(3, 4),
                 rng=jax.random.key(0))
  assert y.shape == x.shape and bool(jnp.isfinite(aux["loss"]))


def test_layer_bad_arguments_raise_value_error_naming_them():
  with pytest.raises(ValueError, match="k=5"):
    layers.MoE(D, H, num_experts=4, k=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="capacity_factor=0"):
    layers.MoE(D, H, num_experts=4, k=2, capacity_factor=0.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="capacity_factor=-1"):
    layers.MoE(D, H, num_experts=4, k=2, capacity_factor=-1.0,
               rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_experts=10 must be a perfect square"):
    layers.PEER(D, num_experts=10, k=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="k=5"):
    layers.PEER(D, num_experts=16, k=5, rngs=nnx.Rngs(0))


def test_product_key_retrieval_equals_brute_force_topk():
  rng = np.random.default_rng(7)
  n, dk, k = 12, 6, 5
  q = jnp.asarray(rng.normal(size=(40, dk)), jnp.float32)
  ka = jnp.asarray(rng.normal(size=(n, dk // 2)), jnp.float32)
  kb = jnp.asarray(rng.normal(size=(n, dk // 2)), jnp.float32)
  scores, idx = layers.product_key_topk(q, ka, kb, k)
  full = np.concatenate([np.repeat(np.asarray(ka), n, 0),
                         np.tile(np.asarray(kb), (n, 1))], 1)   # [N, dk]
  brute = np.asarray(q, np.float64) @ full.T.astype(np.float64)
  ref_idx = np.argsort(-brute, axis=-1)[:, :k]
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(scores, np.take_along_axis(brute, ref_idx, -1),
                             rtol=1e-5, atol=1e-5)


def test_peer_layer_retrieval_and_output():
  layer = layers.PEER(D, num_experts=64, k=3, num_heads=2, d_key=4,
                      rngs=nnx.Rngs(8))
  layer.eval()                      # BatchNorm with running statistics
  x = _x(8, shape=(10, D))
  scores, idx = layer.retrieve(x)
  q = np.asarray(layer.query_norm(layer.query(x))).reshape(10, 2, 4)
  keys = np.asarray(layer.sub_keys[...])
  y, _ = layer(x)
  ref = np.zeros((10, D))
  for h in range(2):
    full = np.concatenate([np.repeat(keys[h, 0], 8, 0),
                           np.tile(keys[h, 1], (8, 1))], 1)
    s = q[:, h] @ full.T
    top = np.argsort(-s, axis=-1)[:, :3]
    np.testing.assert_array_equal(idx[:, h], top)
    g = np.exp(np.take_along_axis(s, top, -1))
    g /= g.sum(-1, keepdims=True)
    u = np.asarray(layer.down[...])[top]
    v = np.asarray(layer.up[...])[top]
    a = np.maximum(np.einsum("td,tkd->tk", np.asarray(x), u), 0) * g
    ref += np.einsum("tk,tkd->td", a, v)
  np.testing.assert_allclose(y, ref, atol=1e-5)
