"""FedBuff on the simulated clock: a hand-computed event trace."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import federated as fl


def _quad(params, batch):
  l = 0.5 * jnp.sum((params["x"] - batch["a"]) ** 2, -1)
  return jnp.sum(l * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def test_fedbuff_trace_matches_hand_computation():
  data = fl.as_client_data({"a": np.array([[[0.0]], [[10.0]]], np.float32)},
                           np.ones(2, np.int32))
  speeds = fl.SpeedModel(jnp.array([1.0, 2.5]), jnp.array([0.0, 0.0]))
  init, run = fl.fedbuff(_quad, optax.sgd(0.5), fl.LocalConfig(1, "steps", 1),
                         speeds, concurrency=2, buffer_size=1,
                         staleness_exponent=0.5)
  state, trace = jax.jit(lambda s: run(s, data, 5))(
      init({"x": jnp.zeros(1)}, data, 0))
  # t=1,2: client 0 (delta 0); t=2.5: client 1, started at version 0 with
  # delta 5, staleness 2 -> x = 5/sqrt(3); t=3: client 0 (delta 0, tau 1);
  # t=4: client 0 dispatched at x=5/sqrt(3): delta -x/2, tau 0.
  np.testing.assert_allclose(trace["clock"], [1, 2, 2.5, 3, 4], rtol=1e-6)
  np.testing.assert_array_equal(trace["client"], [0, 0, 1, 0, 0])
  np.testing.assert_array_equal(trace["staleness"], [0, 0, 2, 1, 0])
  x = 5 / np.sqrt(3)
  np.testing.assert_allclose(state.params["x"], [x / 2], rtol=1e-5)
  assert int(state.version) == 5


def test_fedbuff_buffer_and_clock_invariants():
  rng = np.random.default_rng(0)
  n = 12
  a = rng.normal(size=(n, 1, 2)).astype(np.float32)
  data = fl.as_client_data({"a": a}, np.ones(n, np.int32))
  init, run = fl.fedbuff(_quad, optax.sgd(0.3), fl.LocalConfig(1, "steps", 2),
                         fl.tiered_speeds(n, seed=1), concurrency=4,
                         buffer_size=3)
  state, trace = jax.jit(lambda s: run(s, data, 60))(
      init({"x": jnp.zeros(2)}, data, 1))
  assert np.all(np.diff(np.asarray(trace["clock"])) >= 0)
  np.testing.assert_array_equal(trace["version"], (np.arange(60) + 1) // 3)
  assert np.asarray(trace["staleness"]).min() >= 0
  assert int(np.asarray(state.busy).sum()) == 4
  # identical curvature: iterates approach the mean of the client optima
  assert np.linalg.norm(np.asarray(state.params["x"]) - a[:, 0].mean(0)) < 1.0


def test_fedbuff_bad_arguments():
  sp = fl.tiered_speeds(4)
  with pytest.raises(ValueError, match="concurrency"):
    fl.fedbuff(_quad, optax.sgd(0.1), fl.LocalConfig(1), sp, 5, 1)
  with pytest.raises(ValueError, match="buffer_size"):
    fl.fedbuff(_quad, optax.sgd(0.1), fl.LocalConfig(1), sp, 2, 0)
  with pytest.raises(ValueError, match="fractions"):
    fl.tiered_speeds(4, fractions=(0.5, 0.6, 0.1))
