"""Shared fixtures for the distributed tests: a small least-squares problem."""

import jax.numpy as jnp
import numpy as np
import pytest

from gradax import distributed as gd


@pytest.fixture(scope="session")
def linear_problem():
  """Factory: ``make(seed, din, dout, num_batches, batch_size, noise=0.0)``
  returns ``(mesh "data=8", params {"w", "b"}, batches [{"x", "y"}])`` with
  ``y = x @ w_star (+ noise · N(0, 1))``, all drawn from one seeded stream."""

  def make(seed, din, dout, num_batches, batch_size, noise=0.0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(din, dout)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(dout,)), jnp.float32)}
    wstar = rng.normal(size=(din, dout)).astype(np.float32)
    batches = []
    for _ in range(num_batches):
      x = rng.normal(size=(batch_size, din)).astype(np.float32)
      y = x @ wstar
      if noise:
        y = y + noise * rng.normal(size=(batch_size, dout)).astype(np.float32)
      batches.append({"x": x, "y": y})
    return gd.make_mesh("data=8"), params, batches

  return make
