"""AdAdaGrad's norm test and batch-size controller against hand-computed cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gradax import distributed
from gradax import optimizers as o


def _loss(p, batch):
  # per example: g_i = p - y_i, so the per-example grads are known exactly
  return jnp.mean(0.5 * jnp.sum((p["w"] - batch["y"]) ** 2, axis=-1))


def _stats_np(p, y):
  g = p[None, :] - y
  mean = g.mean(0)
  var = np.sum(np.var(g, axis=0, ddof=1))
  return mean, var


def test_per_example_stats_match_numpy():
  rng = np.random.default_rng(0)
  y = rng.normal(size=(8, 3)).astype(np.float32)
  p = {"w": jnp.array([0.5, -1.0, 2.0])}
  loss, stats = o.per_example_grad_stats(_loss, p, {"y": y})
  mean, var = _stats_np(np.asarray(p["w"]), y)
  np.testing.assert_allclose(stats.grad["w"], mean, rtol=1e-5)
  np.testing.assert_allclose(stats.variance, var, rtol=1e-4)
  np.testing.assert_allclose(stats.mean_sq_norm, np.sum(mean**2), rtol=1e-5)
  assert int(stats.batch_size) == 8
  np.testing.assert_allclose(loss, _loss(p, {"y": y}), rtol=1e-5)


def _stats(b, variance, mean_sq):
  return o.GradStats(grad=None, variance=jnp.float32(variance),
                     mean_sq_norm=jnp.float32(mean_sq),
                     batch_size=jnp.int32(b))


def test_norm_test_hand_computed():
  # Var = 10, b = 4, |g|^2 = 2, eta = 0.5: 10/4 = 2.5 > 0.25*2 = 0.5 -> fail
  passed, b_star = o.norm_test(_stats(4, 10.0, 2.0), eta=0.5)
  assert not bool(passed)
  assert int(b_star) == 20  # ceil(10 / 0.5)
  # b = 32: 10/32 = 0.3125 <= 0.5 -> pass
  passed, _ = o.norm_test(_stats(32, 10.0, 2.0), eta=0.5)
  assert bool(passed)


def test_controller_grows_only_when_the_test_fails():
  ctrl = o.adadagrad_controller(eta=0.5, max_batch_size=1000)
  s = ctrl.init(4)
  s = ctrl.update(s, _stats(4, 10.0, 2.0))  # fails -> b* = 20
  assert int(s.batch_size) == 20 and int(s.num_increases) == 1
  np.testing.assert_allclose(s.last_ratio, 2.5 / 0.5)
  s = ctrl.update(s, _stats(20, 10.0, 2.0))  # 0.5 <= 0.5 passes -> keep
  assert int(s.batch_size) == 20 and int(s.num_increases) == 1
  s = ctrl.update(s, _stats(20, 1.0, 2.0))  # passes; never shrinks
  assert int(s.batch_size) == 20
  s = ctrl.update(s, _stats(20, 1e6, 2.0))  # fails -> capped at the max
  assert o.batch_size_for_next_step(s) == 1000
  assert int(s.count) == 4


def test_controller_power_of_two_and_zero_gradient():
  ctrl = o.adadagrad_controller(eta=0.5, max_batch_size=512,
                                round_to_power_of_two=True)
  s = ctrl.update(ctrl.init(4), _stats(4, 10.0, 2.0))  # b* = 20 -> 32
  assert int(s.batch_size) == 32
  s = ctrl.update(s, _stats(32, 5.0, 0.0))  # zero mean gradient -> max
  assert int(s.batch_size) == 512


def test_end_to_end_with_real_per_example_grads():
  rng = np.random.default_rng(1)
  y = (0.3 + rng.normal(size=(8, 3))).astype(np.float32)
  p = {"w": jnp.zeros(3)}
  _, stats = o.per_example_grad_stats(_loss, p, {"y": y})
  mean, var = _stats_np(np.zeros(3), y)
  eta = 0.2
  fails = var / 8 > eta**2 * np.sum(mean**2)
  s = o.adadagrad_controller(eta=eta).update(
      o.adadagrad_controller(eta=eta).init(8), stats)
  want = max(8, int(np.ceil(var / (eta**2 * np.sum(mean**2))))) if fails else 8
  assert fails  # this draw is noisy enough to need a larger batch
  assert int(s.batch_size) == want


def test_stats_across_replicas_equal_single_replica():
  mesh = distributed.make_mesh("data=8")
  rng = np.random.default_rng(2)
  y = rng.normal(size=(8, 3)).astype(np.float32)
  p = {"w": jnp.array([0.1, 0.2, 0.3])}
  _, single = o.per_example_grad_stats(_loss, p, {"y": y})

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")),
                     out_specs=P(), check_vma=False)
  def dist(p, batch):
    return o.per_example_grad_stats(_loss, p, batch, axis_name="data")

  yd = jax.device_put(y, jax.sharding.NamedSharding(mesh, P("data")))
  loss, multi = jax.jit(dist)(p, {"y": yd})
  np.testing.assert_allclose(multi.variance, single.variance, rtol=1e-5)
  np.testing.assert_allclose(multi.grad["w"], single.grad["w"], rtol=1e-5)
  assert int(multi.batch_size) == 8


@pytest.mark.parametrize("kwargs, name", [
    ({"eta": 0.0}, "eta"), ({"max_batch_size": 0}, "max_batch_size")])
def test_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    o.adadagrad_controller(**kwargs)


def test_bad_initial_batch_size():
  with pytest.raises(ValueError, match="initial_batch_size"):
    o.adadagrad_controller(max_batch_size=16).init(32)


def test_adagrad_norm_hand_computed():
  tx = o.adagrad_norm(0.5, initial_accumulator_value=1.0)
  p = {"a": jnp.zeros(2), "b": jnp.zeros(())}
  s = tx.init(p)
  g1 = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}  # |g|^2 = 25
  u, s = tx.update(g1, s, p)
  np.testing.assert_allclose(u["a"], [-0.5 * 3 / np.sqrt(26), 0.0], rtol=1e-6)
  g2 = {"a": jnp.array([1.0, 1.0]), "b": jnp.array(0.0)}  # |g|^2 = 2
  u, s = tx.update(g2, s, p)
  np.testing.assert_allclose(u["a"], [-0.5 / np.sqrt(28)] * 2, rtol=1e-6)
  with pytest.raises(ValueError, match="initial_accumulator_value"):
    o.adagrad_norm(0.1, initial_accumulator_value=0.0)
