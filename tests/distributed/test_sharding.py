"""Sharding rules, placement helpers and ZeRO-sharded data-parallel steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gradax import distributed as gd
from gradax.distributed import sharding as sh
from gradax.distributed.data_parallel import data_parallel


def test_rules_pick_largest_divisible_dim_and_replicate_the_rest():
  mesh = gd.make_mesh("data=4,model=2")
  tree = {"w": jnp.zeros((6, 8)), "b": jnp.zeros((3,)), "s": jnp.zeros(()),
          "v": jnp.zeros((12, 4))}
  specs = sh.specs(tree, mesh, "sharded")
  assert specs == {"w": P(None, "data"), "b": P(), "s": P(), "v": P("data")}
  assert sh.specs(tree, mesh, "replicated") == jax.tree.map(lambda _: P(),
                                                            tree)


def test_place_and_per_replica_helpers_round_trip():
  mesh = gd.make_mesh("data=8")
  x = {"a": jnp.arange(16.0).reshape(16, 1)}
  placed = sh.place(x, mesh, "sharded")
  assert placed["a"].sharding.spec == P("data")
  assert sh.bytes_per_device(placed) == 2 * 4
  rep = sh.per_replica({"a": jnp.ones((3,))}, mesh)
  assert rep["a"].shape == (8, 3) and rep["a"].sharding.spec == P("data")
  np.testing.assert_array_equal(sh.replica(rep, 5)["a"], np.ones(3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="diagonal"), "not a sharding rule"),
    (dict(axis_name="batch"), "not an axis of the mesh"),
])
def test_bad_rules_and_axes_are_named(kwargs, match):
  mesh = gd.make_mesh("data=8")
  rule = kwargs.pop("rule", "sharded")
  with pytest.raises(ValueError, match=match):
    sh.specs({"w": jnp.zeros((8,))}, mesh, rule, **kwargs)


def test_bad_plans_are_rejected():
  mesh = gd.make_mesh("data=8")
  loss = lambda p, b: jnp.sum(p["w"])
  with pytest.raises(ValueError, match="ZeRO stage"):
    sh.zero_plan(4)
  with pytest.raises(ValueError, match="sharded optimizer state"):
    data_parallel(loss, optax.sgd(1.0), mesh,
                  plan=sh.ShardingPlan(grads="sharded"))
  with pytest.raises(ValueError, match="microbatches"):
    data_parallel(loss, optax.sgd(1.0), mesh, microbatches=0)
  with pytest.raises(ValueError, match="divisible by the 8 replicas"):
    alg = data_parallel(loss, optax.sgd(1.0), mesh)
    alg.step(alg.init({"w": jnp.zeros((8,))}), {"x": np.zeros((12, 2))})


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}

  def loss(p, batch):
    return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

  batches = [{"x": rng.normal(size=(32, 16)).astype(np.float32),
              "y": rng.normal(size=(32, 8)).astype(np.float32)}
             for _ in range(3)]
  return params, loss, batches


@pytest.fixture(scope="module")
def replicated_run():
  params, loss, batches = _problem()
  mesh = gd.make_mesh("data=8")
  ref = data_parallel(loss, optax.adam(1e-2), mesh, plan=0)
  s = ref.init(params)
  for b in batches:
    s, _ = ref.step(s, b)
  return s


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_state_matches_replicated_and_shrinks_per_device(stage,
                                                              replicated_run):
  params, loss, batches = _problem()
  mesh = gd.make_mesh("data=8")
  sr = replicated_run
  zero = data_parallel(loss, optax.adam(1e-2), mesh, plan=stage,
                       microbatches=2)
  sz = zero.init(params)
  for b in batches:
    sz, _ = zero.step(sz, b)
  for a, z in zip(jax.tree.leaves(sr.params), jax.tree.leaves(sz.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(z), rtol=1e-5,
                               atol=1e-6)
  # Every non-scalar optimizer-state leaf (Adam's mu and nu) is 8x smaller.
  big = lambda s: [x for x in jax.tree.leaves(s.opt_state) if x.ndim]
  assert sh.bytes_per_device(big(sz)) * 8 == sh.bytes_per_device(big(sr))
  if stage == 3:
    assert sh.bytes_per_device(sz.params) * 8 == sh.bytes_per_device(sr.params)
  else:
    assert sh.bytes_per_device(sz.params) == sh.bytes_per_device(sr.params)
  assert tuple(jax.typeof(sz.opt_state[0].mu["w"]).sharding.spec)[0] == "data"
