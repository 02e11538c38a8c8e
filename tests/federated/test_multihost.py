"""Client sharding across hosts: one FedAvg and one FedAU run (2 rounds) with
the clients split over a ``clients`` mesh axis in 2 processes x 2 CPU devices
(jax.distributed on 127.0.0.1, gloo) equals 1 process x 4 devices (which
test_core checks against the plain vmapped round)."""

import importlib.util
import os

import numpy as np


def scenario():
  """Two rounds of FedAvg and FedAU; returns host arrays of the params."""
  import jax
  import optax
  from jax.experimental import multihost_utils

  from gradax import federated as fl
  from gradax.distributed import make_mesh
  from gradax.federated import models

  mesh = make_mesh("clients=4", devices=jax.devices()[:4])
  rng = np.random.default_rng(0)
  n = 8
  # unequal dataset sizes (padding + masks); numpy leaves so every process
  # passes the same replicated host values
  data = fl.ClientData(
      {"x": rng.normal(size=(n, 12, 5)).astype(np.float32),
       "y": rng.integers(0, 3, size=(n, 12)).astype(np.int32)},
      np.array([12, 7, 12, 3, 12, 12, 9, 12], np.int32))
  model = models.softmax_regression(5, 3)
  loss = models.masked_xent(model)
  local = fl.LocalConfig(4, "steps", 3)
  parts = [np.array([1, 0, 1, 1, 0, 1, 1, 1], bool),
           np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)]
  params0 = jax.tree.map(
      np.asarray, {"w": rng.normal(size=(5, 3)).astype(np.float32),
                   "b": np.zeros(3, np.float32)})
  out = {}
  for name, make in (("fedavg", fl.fedavg), ("fedau", fl.fedau)):
    alg = make(loss, optax.sgd(0.2), local, n, capacity=8, mesh=mesh)
    state = jax.tree.map(np.asarray, alg.init(params0))
    rnd = jax.jit(alg.round)
    for t, p in enumerate(parts):
      inp = fl.RoundInput(p, np.asarray(jax.random.PRNGKey(t)),
                          np.full(n, 3, np.int32))
      state, _ = rnd(state, data, inp)
    out[name] = jax.tree.map(
        lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
        state.params)
  return out


def _run_two_processes():
  """The distributed package's 2-process launcher (one for the whole suite)."""
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                      "distributed", "test_multihost.py")
  spec = importlib.util.spec_from_file_location("_dist_multihost", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.run_two_processes


def test_two_processes_match_one_process(tmp_path):
  got = _run_two_processes()(__file__, tmp_path)
  one = scenario()                    # this process: 1 x 4 of its 8 devices
  for alg in ("fedavg", "fedau"):
    for leaf in ("w", "b"):
      np.testing.assert_allclose(got[f"{alg}/{leaf}"], one[alg][leaf],
                                 rtol=1e-5, atol=1e-6)
  # the round did something, and the two algorithms differ (FedAU's weights)
  assert not np.allclose(got["fedavg/w"], got["fedau/w"])
