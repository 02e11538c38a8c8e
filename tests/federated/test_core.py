"""Client machinery: local training, masking, client mapping and rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import federated as fl
from gradax.distributed import make_mesh
from gradax.federated import core


def _lsq_loss(params, batch):
  r = batch["x"] @ params["w"] - batch["y"]
  return jnp.sum(0.5 * r**2 * batch["mask"]) / jnp.maximum(
      jnp.sum(batch["mask"]), 1.0)


@pytest.fixture(scope="module")
def lsq_data():
  rng = np.random.default_rng(0)
  n, m, d = 8, 12, 3
  x = rng.normal(size=(n, m, d)).astype(np.float32)
  y = rng.normal(size=(n, m)).astype(np.float32)
  counts = np.array([12, 5, 0, 7, 12, 3, 9, 1], np.int32)
  return fl.as_client_data({"x": x, "y": y}, counts)


def _ref_local_steps(w, x, y, n, key, steps, bsz, lr, mu=0.0):
  """Plain numpy SGD with the documented sampler (fold_in(key, s) draws)."""
  w = np.array(w, np.float64)
  w0 = w.copy()
  for s in range(steps):
    idx = np.asarray(jax.random.randint(jax.random.fold_in(key, s), (bsz,), 0,
                                        max(n, 1)))
    xb, yb = x[idx], y[idx]
    g = xb.T @ (xb @ w - yb) / bsz + mu * (w - w0)
    w = w - lr * g
  return w


def test_local_train_matches_plain_sgd(lsq_data):
  key = jax.random.key(3)
  cfg = fl.LocalConfig(4, "steps", 6)
  x = np.asarray(lsq_data.examples["x"][0])
  y = np.asarray(lsq_data.examples["y"][0])
  out = jax.jit(lambda: fl.local_train(
      _lsq_loss, optax.sgd(0.1), {"w": jnp.ones(3)},
      {"x": x, "y": y}, 12, 4, key, cfg,
      fl.proximal_hook(0.5)))()
  ref = _ref_local_steps(np.ones(3), x, y, 12, key, 4, 4, 0.1, mu=0.5)
  np.testing.assert_allclose(out.params["w"], ref, rtol=1e-5, atol=1e-6)
  assert int(out.num_steps) == 4      # 4 of the 6 scan steps are active


def test_batcher_drawn_up_front_equals_step_by_step(lsq_data):
  # local_train asks make_batcher for the whole scan's indices in one draw;
  # they must be the documented per-step fold_in(key, s) draws, bit for bit.
  cfg = fl.LocalConfig(4, "steps", 5)
  ex = {k: v[1] for k, v in lsq_data.examples.items()}    # n_k = 5 of 12
  key = jax.random.key(7)

  def batches(num_steps):
    at = core.make_batcher(cfg, ex, 5, key, num_steps=num_steps)
    return jax.lax.map(at, jnp.arange(5, dtype=jnp.int32))

  ahead, stepwise = jax.jit(lambda: (batches(5), batches(None)))()
  for k in ("x", "y", "mask"):
    np.testing.assert_array_equal(ahead[k], stepwise[k])
  idx = np.stack([np.asarray(jax.random.randint(jax.random.fold_in(key, s),
                                                (4,), 0, 5))
                  for s in range(5)])
  np.testing.assert_array_equal(ahead["x"], np.asarray(ex["x"])[idx])


def test_epoch_mode_visits_every_example_once_per_epoch():
  # Each example carries a unit vector; with lr=1 on loss -<w, x> summed via
  # mask, the update counts how often each example was used.
  m, n_k, bsz = 10, 7, 3
  x = np.eye(m, dtype=np.float32)

  def loss(p, batch):
    return -jnp.sum(jnp.sum(batch["x"] * p["w"], -1) * batch["mask"])

  cfg = fl.LocalConfig(bsz, "epochs", 3)
  out = jax.jit(lambda: fl.local_train(
      loss, optax.sgd(1.0), {"w": jnp.zeros(m)}, {"x": x}, n_k, 2,
      jax.random.key(0), cfg))()
  # 2 epochs x ceil(7/3)=3 steps; each real example seen exactly twice
  assert int(out.num_steps) == 6
  np.testing.assert_allclose(out.params["w"][:n_k], 2.0)
  np.testing.assert_allclose(out.params["w"][n_k:], 0.0)


def test_round_skips_empty_clients_and_matches_reference(lsq_data):
  n = lsq_data.num_clients
  cfg = fl.LocalConfig(2, "steps", 3)
  alg = fl.fedavg(_lsq_loss, optax.sgd(0.05), cfg, n)
  p0 = {"w": jnp.full((3,), 0.5)}
  state = alg.init(p0)
  part = np.array([1, 1, 1, 0, 1, 0, 1, 1], bool)     # client 2 has 0 examples
  key = jax.random.key(7)
  new, diag = jax.jit(alg.round)(state, lsq_data,
                                 fl.make_round_input(part, key, 3))
  assert int(diag["num_participants"]) == 5
  assert np.all(np.isfinite(np.asarray(new.params["w"])))
  num, den = np.zeros(3), 0.0
  for c in np.flatnonzero(part):
    nk = int(lsq_data.num_examples[c])
    if nk == 0:
      continue
    y = _ref_local_steps(np.full(3, 0.5), np.asarray(lsq_data.examples["x"][c]),
                         np.asarray(lsq_data.examples["y"][c]), nk,
                         jax.random.fold_in(key, c), 3, 2, 0.05)
    num += nk * (y - 0.5)
    den += nk
  np.testing.assert_allclose(new.params["w"], 0.5 + num / den, rtol=1e-5,
                             atol=1e-6)


@pytest.fixture(scope="module")
def fedau_alg(lsq_data):
  alg = fl.fedau(_lsq_loss, optax.sgd(0.05), fl.LocalConfig(2, "steps", 2),
                 lsq_data.num_clients, cutoff=2)
  return alg, jax.jit(alg.round)


def test_only_empty_participants_leaves_model_unchanged(lsq_data, fedau_alg):
  n = lsq_data.num_clients
  alg, round_fn = fedau_alg
  state = alg.init({"w": jnp.ones(3)})
  part = np.zeros(n, bool)
  part[2] = True                                       # the empty client
  new, diag = round_fn(state, lsq_data,
                       fl.make_round_input(part, jax.random.key(0), 2))
  np.testing.assert_array_equal(new.params["w"], np.ones(3))
  assert int(diag["num_participants"]) == 0
  # the empty client counts as absent for FedAU: its weights stay finite
  assert np.all(np.isfinite(np.asarray(new.agg_state.interval_sum)))
  assert int(new.agg_state.since[2]) == 1


def test_sharded_clients_equal_vmapped(lsq_data):
  n = lsq_data.num_clients
  mesh = make_mesh("clients=8")
  cfg = fl.LocalConfig(2, "steps", 3)
  plain = fl.fedavg(_lsq_loss, optax.sgd(0.05), cfg, n)
  sharded = fl.fedavg(_lsq_loss, optax.sgd(0.05), cfg, n, mesh=mesh)
  part = np.array([1, 1, 0, 1, 1, 1, 1, 1], bool)
  inp = fl.make_round_input(part, jax.random.key(1), 3)
  s0 = plain.init({"w": jnp.ones(3)})
  a, _ = jax.jit(plain.round)(s0, lsq_data, inp)
  b, _ = jax.jit(sharded.round)(s0, lsq_data, inp)
  np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6)


def test_clients_in_place_equal_compacted_slots(lsq_data):
  # capacity N keeps client n in slot n (no gather); a smaller capacity
  # compacts the participants into slots: same rounds, same FedAU state
  n = lsq_data.num_clients
  part = np.array([[1, 0, 1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 0, 0, 1],
                   [1, 1, 0, 0, 0, 1, 1, 0]], bool)
  keys = jax.random.split(jax.random.key(5), 3)
  out = []
  for cap in (n, 4):
    alg = fl.fedau(_lsq_loss, optax.sgd(0.05), fl.LocalConfig(2, "steps", 2),
                   n, cutoff=2, capacity=cap)
    state, diag = jax.jit(lambda s, alg=alg: fl.run_rounds(
        alg, s, lsq_data, part, keys, 2))(alg.init({"w": jnp.ones(3)}))
    out.append((state, diag))
  (a, da), (b, db) = out
  np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6)
  for x, y in zip(jax.tree.leaves(a.agg_state), jax.tree.leaves(b.agg_state)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(da["num_participants"], [3, 3, 4])
  np.testing.assert_array_equal(da["num_participants"], db["num_participants"])
  np.testing.assert_array_equal(db["overflow"], [0, 0, 0])


def test_capacity_overflow_is_counted(lsq_data):
  n = lsq_data.num_clients
  alg = fl.fedavg(_lsq_loss, optax.sgd(0.05), fl.LocalConfig(2, "steps", 1),
                  n, capacity=2)
  part = np.ones(n, bool)
  _, diag = jax.jit(alg.round)(alg.init({"w": jnp.ones(3)}), lsq_data,
                      fl.make_round_input(part, jax.random.key(0), 1))
  assert int(diag["num_participants"]) == 2
  assert int(diag["overflow"]) == 5                    # 7 non-empty - 2


def test_run_rounds_equals_round_loop(lsq_data, fedau_alg):
  n = lsq_data.num_clients
  alg, round_fn = fedau_alg
  part = fl.participation.Bernoulli(np.full(n, 0.5)).sample(4, seed=0)
  keys = jax.random.split(jax.random.key(0), 4)
  s = alg.init({"w": jnp.ones(3)})
  scanned, _ = jax.jit(lambda s: fl.run_rounds(alg, s, lsq_data, part, keys,
                                               2))(s)
  for t in range(4):
    s, _ = round_fn(s, lsq_data, fl.make_round_input(part[t], keys[t], 2))
  np.testing.assert_allclose(scanned.params["w"], s.params["w"], rtol=1e-6)
  np.testing.assert_array_equal(scanned.agg_state.since, s.agg_state.since)


def test_mismatched_client_counts_raise(lsq_data):
  n = lsq_data.num_clients
  alg = fl.fedavg(_lsq_loss, optax.sgd(0.05), fl.LocalConfig(2), n)
  s = alg.init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="participat"):
    alg.round(s, lsq_data, fl.make_round_input(np.ones(n + 1, bool),
                                               jax.random.key(0), 1))
  with pytest.raises(ValueError, match="participation covers 5 clients"):
    fl.run_rounds(alg, s, lsq_data, np.ones((2, 5), bool), jax.random.key(0),
                  1)
  with pytest.raises(ValueError, match="must match"):
    fl.participation.check_matches(fl.participation.Full(5), n)
  with pytest.raises(ValueError, match="clients"):
    fl.as_client_data({"x": np.zeros((3, 2))}, np.ones(4))


def test_bad_local_config():
  with pytest.raises(ValueError, match="batch_size"):
    fl.LocalConfig(0)
  with pytest.raises(ValueError, match="unit"):
    fl.LocalConfig(2, "minutes")
