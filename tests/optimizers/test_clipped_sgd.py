"""Clipped SGD against hand-computed clipping, and under heavy-tailed noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import optimizers


def test_global_norm_clip_hand_computed():
  tx = optimizers.clipped_sgd(0.5, clip_threshold=1.0)
  g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # norm 5
  p = jax.tree.map(jnp.zeros_like, g)
  u, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(u["a"], [-0.5 * 3 / 5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(u["b"], [[-0.5 * 4 / 5]], rtol=1e-6)
  # below the threshold nothing is clipped
  small = jax.tree.map(lambda x: x / 10, g)
  u, _ = tx.update(small, tx.init(p), p)
  np.testing.assert_allclose(u["a"], [-0.5 * 0.3, 0.0], rtol=1e-6)


def test_coordinate_clip_and_momentum():
  tx = optimizers.scale_by_clipped_sgd(0.5, momentum=0.5,
                                       clip_mode="coordinate")
  p = jnp.zeros(3)
  s = tx.init(p)
  u1, s = tx.update(jnp.array([2.0, -0.2, -3.0]), s)
  np.testing.assert_allclose(u1, 0.5 * np.array([0.5, -0.2, -0.5]))
  u2, s = tx.update(jnp.array([0.1, 0.1, 0.1]), s)
  np.testing.assert_allclose(u2, 0.5 * u1 + 0.5 * 0.1, rtol=1e-6)


def test_threshold_schedule_uses_step_count():
  sched = lambda c: 1.0 + c  # 1 at step 0, 2 at step 1
  tx = optimizers.scale_by_clipped_sgd(sched)
  s = tx.init(jnp.zeros(1))
  u, s = tx.update(jnp.array([10.0]), s)
  assert float(u[0]) == pytest.approx(1.0)
  u, s = tx.update(jnp.array([10.0]), s)
  assert float(u[0]) == pytest.approx(2.0)


def _final_error(tx, key, steps=2000):
  x0 = jnp.array([5.0, -5.0])
  noise = 0.5 * jax.random.t(key, df=1.2, shape=(steps, 2))  # infinite var

  def body(carry, n):
    x, s = carry
    u, s = tx.update(x + n, s, x)  # f = |x|^2 / 2
    return (optax.apply_updates(x, u), s), None

  (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), noise)
  return float(jnp.linalg.norm(x))


def test_heavy_tailed_noise_clipping_beats_plain_sgd():
  key = jax.random.key(0)
  clipped = _final_error(optimizers.clipped_sgd(0.02, clip_threshold=1.0),
                         key)
  plain = _final_error(optax.sgd(0.02), key)
  assert clipped < 0.3
  assert clipped < plain


@pytest.mark.parametrize("kwargs, name", [
    ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"momentum": 1.0}, "momentum"),
    ({"clip_mode": "l1"}, "clip_mode")])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optimizers.clipped_sgd(0.1, **kwargs)
