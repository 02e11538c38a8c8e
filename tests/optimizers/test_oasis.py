"""OASIS against a NumPy reference of its rule on a separable objective.

For a separable objective the Hessian is diagonal, so Hutchinson's
z * (H z) equals diag(H) exactly for every Rademacher z, which makes the whole
trajectory deterministic and checkable by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import optimizers

A = np.array([1.0, 10.0, -0.5, 100.0])  # one negative curvature coordinate
C = np.array([0.5, 0.0, 1.0, 0.1])
BV = np.array([1.0, -1.0, 0.5, 2.0])


def _obj(x):
  return jnp.sum(0.5 * A * x**2 + 0.25 * C * x**4 - BV * x)


def _grad(x):
  return A * x + C * x**3 - BV


def _hdiag(x):
  return A + 3 * C * x**2


def _reference(x0, eta0, b2, alpha, lr, steps):
  x, prev = x0.copy(), x0.copy()
  eta, theta = eta0, np.inf
  d = None
  traj, etas = [], []
  for k in range(steps):
    h = _hdiag(x)
    d = h if k == 0 else b2 * d + (1 - b2) * h
    dh = np.maximum(np.abs(d), alpha)
    dw = x - prev
    dg = _grad(x) - _grad(prev)
    if np.any(dw != 0) and np.any(dg != 0):
      est = np.sqrt(np.sum(dh * dw**2)) / (2 * np.sqrt(np.sum(dg**2 / dh)))
      new = min(np.sqrt(1 + theta) * eta, est)
      theta, eta = new / eta, new
    prev = x
    x = x - lr * eta * _grad(x) / dh
    traj.append(x.copy())
    etas.append(eta)
  return traj, etas


def test_matches_reference_on_separable_objective():
  x0 = np.array([0.5, -0.3, 0.2, 0.05])
  eta0, b2, alpha, lr = 0.05, 0.9, 1e-3, 0.8
  want, want_eta = _reference(x0, eta0, b2, alpha, lr, steps=8)
  tx = optimizers.oasis(lr, init_step_size=eta0, b2=b2, alpha=alpha)
  x = jnp.asarray(x0, jnp.float32)
  state = tx.init(x)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, obj_fn=_obj))
  for k in range(8):
    u, state = step(jax.grad(_obj)(x), state, x)
    x = optax.apply_updates(x, u)
    np.testing.assert_allclose(x, want[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state[0].step_size, want_eta[k], rtol=1e-4)
  # the Lipschitz estimate moved the step away from eta0
  assert abs(want_eta[-1] - eta0) > 1e-3


def test_converges_on_rotated_ill_conditioned_quadratic():
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
  h = jnp.asarray(q @ np.diag([1.0, 30.0, 300.0]) @ q.T, jnp.float32)
  target = jnp.array([1.0, -2.0, 0.5])
  obj = lambda x: 0.5 * (x - target) @ h @ (x - target)
  tx = optimizers.oasis(init_step_size=1e-3)
  x = jnp.zeros(3)

  def body(carry, _):
    x, s = carry
    u, s = tx.update(jax.grad(obj)(x), s, x, obj_fn=obj)
    return (optax.apply_updates(x, u), s), None

  (x, _), _ = jax.lax.scan(body, (x, tx.init(x)), None, length=500)
  np.testing.assert_allclose(x, target, atol=1e-2)


def test_requires_obj_fn_and_params():
  tx = optimizers.oasis()
  p = jnp.zeros(2)
  s = tx.init(p)
  with pytest.raises(ValueError, match="obj_fn"):
    tx.update(p, s, p)
  with pytest.raises(ValueError, match="params"):
    tx.update(p, s, obj_fn=lambda x: jnp.sum(x**2))


@pytest.mark.parametrize("kwargs, name", [
    ({"init_step_size": 0.0}, "init_step_size"), ({"b2": 1.0}, "b2"),
    ({"alpha": 0.0}, "alpha")])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optimizers.oasis(**kwargs)
