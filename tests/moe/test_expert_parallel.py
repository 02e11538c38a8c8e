"""Expert parallelism on 8 fake CPU devices equals the single-device result."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax.distributed import make_mesh
from gradax.distributed.comm_bytes import hlo_collectives
from gradax.moe import dispatch, expert_parallel as ep, routing

T, D, H, E, K = 64, 8, 16, 8, 2


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  wr = jnp.asarray(rng.normal(size=(D, E)), jnp.float32)
  p = {"wi": jnp.asarray(rng.normal(size=(E, D, H)) / 3, jnp.float32),
       "wo": jnp.asarray(rng.normal(size=(E, H, D)) / 3, jnp.float32)}
  return x, wr, p


def _single_device(x, wr, p, capacity=None, groups=1):
  """Reference: the loop oracle, routed per token group (one group per
  device for the capacity-padded strategy)."""
  ys = []
  for xg in jnp.split(x, groups):
    r = routing.top_k_routing(xg @ wr, K)
    ys.append(dispatch.loop_dispatch(xg, r.expert_index, r.combine_weights, p,
                                     capacity=capacity)[0])
  return jnp.concatenate(ys)


def _loss_fn(fn):
  return lambda x, wr, p: jnp.sum(jnp.tanh(fn(x, wr, p)) * jnp.arange(D))


CASES = [("expert=8", {}), ("data=2,expert=4", {"data_axis": "data"}),
         ("expert=4,model=2", {"model_axis": "model"})]


@pytest.mark.parametrize("strategy", ["all_to_all", "ring"])
@pytest.mark.parametrize("spec,axes", CASES)
def test_expert_parallel_matches_single_device(problem, strategy, spec, axes):
  x, wr, p = problem
  mesh = make_mesh(spec)
  f = jax.jit(lambda x, wr, p: ep.expert_parallel_moe(
      x, wr, p, mesh=mesh, k=K, strategy=strategy, **axes))
  y, aux = f(x, wr, p)
  np.testing.assert_allclose(y, _single_device(x, wr, p), atol=1e-5)
  r = routing.top_k_routing(x @ wr, K)
  np.testing.assert_allclose(aux["load_balancing_loss"],
                             r.aux_losses["load_balancing_loss"], rtol=1e-6)
  np.testing.assert_allclose(aux["router_z_loss"],
                             r.aux_losses["router_z_loss"], rtol=1e-6)
  if spec == "expert=8":   # gradients through shard_map and the collectives
    g = jax.jit(jax.grad(_loss_fn(lambda *a: f(*a)[0]), argnums=(0, 1, 2)))(
        x, wr, p)
    g0 = jax.jit(jax.grad(_loss_fn(_single_device), argnums=(0, 1, 2)))(
        x, wr, p)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_capacity_all_to_all_drops_per_device_group(problem):
  x, wr, p = problem
  mesh = make_mesh("expert=8")
  y, aux = jax.jit(lambda x, wr, p: ep.expert_parallel_moe(
      x, wr, p, mesh=mesh, k=K, capacity_factor=1.0))(x, wr, p)
  # T_local = 8 tokens per device, C = ceil(1.0 * 8 * 2 / 8) = 2 per group.
  ref = _single_device(x, wr, p, capacity=2, groups=8)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert float(aux["fraction_dropped"]) > 0


@pytest.fixture(scope="module")
def hlo_counts(problem):
  x, wr, p = problem
  mesh = make_mesh("expert=8")
  out = {}
  for s in ep.STRATEGIES:
    f = jax.jit(lambda x, wr, p, s=s: ep.expert_parallel_moe(
        x, wr, p, mesh=mesh, k=K, strategy=s, capacity_factor=1.25)[0])
    text = f.lower(x, wr, p).compile().as_text()
    out[s] = collections.Counter(c.op for c in hlo_collectives(text, 8))
  return out


def test_capacity_strategy_has_two_all_to_alls_forward(hlo_counts):
  c = hlo_counts["all_to_all"]
  assert c["all-to-all"] == 2
  assert c["all-gather"] == 0 and c["reduce-scatter"] == 0
  assert c["ragged-all-to-all"] == 0


def test_ring_has_one_all_gather_and_one_reduce_scatter(hlo_counts):
  c = hlo_counts["ring"]
  assert c["all-gather"] == 1 and c["reduce-scatter"] == 1
  assert c["all-to-all"] == 0


def test_bad_arguments_raise_value_error_naming_them(problem):
  x, wr, p = problem
  mesh = make_mesh("expert=8")
  p6 = {n: v[:6] for n, v in p.items()}
  with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
    ep.expert_parallel_moe(x, wr[:, :6], p6, mesh=mesh, k=2)
  with pytest.raises(ValueError, match="k=9"):
    ep.expert_parallel_moe(x, wr, p, mesh=mesh, k=9)
  with pytest.raises(ValueError, match="capacity_factor=0"):
    ep.expert_parallel_moe(x, wr, p, mesh=mesh, k=2, capacity_factor=0.0)
  with pytest.raises(ValueError, match="strategy='ragged'"):
    ep.expert_parallel_moe(x, wr, p, mesh=mesh, k=2, strategy="ragged")


def test_bytes_per_token_model():
  # all_to_all: 2 * (n-1)/n * E * C * d * 4 / T_l; ring: 2 * (n-1) * d * 4.
  a2a = ep.collective_bytes_per_token("all_to_all", num_tokens=8, d_model=16,
                                      num_experts=8, k=2, axis_size=8,
                                      capacity_factor=1.0)
  assert a2a == pytest.approx(2 * 7 / 8 * 8 * 2 * 16 * 4 / 8)
  ring = ep.collective_bytes_per_token("ring", num_tokens=8, d_model=16,
                                       num_experts=8, k=2, axis_size=8)
  assert ring == pytest.approx(2 * 7 * 16 * 4)


def test_sharding_rules_combine_axes():
  rules = ep.sharding_rules("expert", "data", "model")
  specs = ep.param_specs(rules, gated=True)
  assert specs["wi"] == jax.sharding.PartitionSpec("expert", None, "model")
  assert specs["wo"] == jax.sharding.PartitionSpec("expert", "model", None)
  assert ep.logical_to_spec(ep.LOGICAL_AXES["tokens"], rules) == (
      jax.sharding.PartitionSpec(("data", "expert"), None))
