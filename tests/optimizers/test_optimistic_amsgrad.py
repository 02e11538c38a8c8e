"""Optimistic AMSGrad against the paper's two-sequence form, written here."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import optimizers

A = np.diag([1.0, 4.0, 0.5])
B = np.array([0.3, -1.0, 2.0])


def _grad(w):
  return A @ w - B


def _reference(w0, lr, b1, b2, eps, steps):
  """w_{t+1/2} = w_{t-1/2} - lr th/(sqrt(vh)+eps); w_{t+1} = w_{t+1/2} - lr h."""
  w_half = w0.copy()
  w = w0.copy()
  th = np.zeros(3)
  v = np.zeros(3)
  vh = np.zeros(3)
  traj = []
  for _ in range(steps):
    g = _grad(w)
    th_prev = th
    th = b1 * th + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    vh = np.maximum(vh, v)
    den = np.sqrt(vh) + eps
    w_half = w_half - lr * th / den
    hint = b1 * th + (1 - b1) * g  # guess of theta_{t+1}, with m_{t+1} = g_t
    w = w_half - lr * hint / den
    traj.append(w.copy())
    del th_prev
  return traj


def test_matches_two_sequence_form():
  lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-8
  w0 = np.array([1.0, -2.0, 0.5])
  want = _reference(w0, lr, b1, b2, eps, steps=6)
  tx = optimizers.optimistic_amsgrad(lr, b1=b1, b2=b2, eps=eps)
  w = jnp.asarray(w0, jnp.float32)
  state = tx.init(w)
  step = jax.jit(tx.update)
  for t in range(6):
    g = jnp.asarray(_grad(np.asarray(w, np.float64)), jnp.float32)
    u, state = step(g, state, w)
    w = optax.apply_updates(w, u)
    np.testing.assert_allclose(w, want[t], rtol=2e-5, atol=2e-6)


def test_nu_max_is_monotone():
  tx = optimizers.scale_by_optimistic_amsgrad(b2=0.5)
  state = tx.init(jnp.zeros(2))
  _, state = tx.update(jnp.array([3.0, 1.0]), state)
  first = state.nu_max
  _, state = tx.update(jnp.array([0.0, 0.0]), state)
  np.testing.assert_array_equal(state.nu_max, first)  # v shrank; v-hat kept


def test_converges_on_quadratic():
  tx = optimizers.optimistic_amsgrad(0.05)
  w = jnp.array([1.0, -2.0, 0.5])
  state = tx.init(w)

  def body(carry, _):
    w, s = carry
    u, s = tx.update(jnp.asarray(A, jnp.float32) @ w - B, s, w)
    return (optax.apply_updates(w, u), s), None

  (w, _), _ = jax.lax.scan(body, (w, state), None, length=3000)
  np.testing.assert_allclose(w, np.linalg.solve(A, B), atol=2e-2)


@pytest.mark.parametrize("kwargs, name", [
    ({"b1": 1.5}, "b1"), ({"b2": 1.0}, "b2"), ({"eps": 0.0}, "eps")])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optimizers.optimistic_amsgrad(1e-3, **kwargs)
