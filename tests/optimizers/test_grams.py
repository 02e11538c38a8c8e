"""Grams against a plain NumPy reference of its published rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import optimizers


def _reference(x0, grads, lr, b1, b2, eps, wd):
  x = x0.copy()
  m = np.zeros_like(x)
  v = np.zeros_like(x)
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh = m / (1 - b1**t)
    vh = v / (1 - b2**t)
    u = np.sign(g) * np.abs(mh) / (np.sqrt(vh) + eps)
    x = x - lr * (u + wd * x)
  return x


def test_matches_reference_over_steps():
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(5,)).astype(np.float64)
  grads = [rng.normal(size=(5,)) for _ in range(4)]
  tx = optimizers.grams(0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01)
  params = {"w": jnp.asarray(x0, jnp.float32)}
  state = tx.init(params)
  for g in grads:
    u, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, u)
  want = _reference(x0, grads, 0.1, 0.9, 0.99, 1e-8, 0.01)
  np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=1e-6)


def test_direction_is_the_gradient_sign_even_against_momentum():
  # Build momentum pointing +, then feed a small negative gradient.
  tx = optimizers.scale_by_grams(b1=0.9, b2=0.999)
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(jnp.array([1.0, 1.0, 1.0]), state)
  u, state = tx.update(jnp.array([-0.1, 0.5, 0.0]), state)
  assert np.sign(u[0]) == -1.0  # from g, although m > 0 (cautious: 0)
  assert np.sign(u[1]) == 1.0
  assert u[2] == 0.0  # sign(0) = 0
  # magnitude is Adam's |m_hat|/(sqrt(v_hat)+eps)
  m = 0.9 * 0.1 * 1.0 + 0.1 * -0.1
  v = 0.999 * 0.001 + 0.001 * 0.01
  want = abs(m / (1 - 0.81)) / (np.sqrt(v / (1 - 0.999**2)) + 1e-8)
  np.testing.assert_allclose(abs(float(u[0])), want, rtol=1e-4)


def test_bf16_updates_keep_dtype():
  tx = optimizers.grams(1e-3)
  p = jnp.ones((4,), jnp.bfloat16)
  u, _ = jax.jit(tx.update)(p, tx.init(p), p)
  assert u.dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, name", [
    ({"b1": 1.0}, "b1"), ({"b2": -0.1}, "b2"), ({"eps": -1.0}, "eps"),
    ({"weight_decay": -1.0}, "weight_decay")])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optimizers.grams(1e-3, **kwargs)
