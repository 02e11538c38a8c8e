"""Local SGD, DiLoCo, Streaming DiLoCo, eager updates and CO2 against plain
per-replica reference loops written here."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import distributed as gd
from gradax.distributed.co2 import co2
from gradax.distributed.comm_bytes import comm_bytes
from gradax.distributed.data_parallel import data_parallel
from gradax.distributed.diloco import diloco
from gradax.distributed.eager_updates import eager_diloco
from gradax.distributed.local_sgd import local_sgd
from gradax.distributed.streaming_diloco import streaming_diloco

N = 8
LR = 0.05


def loss(p, batch):
  return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def setup(linear_problem):
  return linear_problem(0, 6, 3, num_batches=8, batch_size=16, noise=0.1)


def shard(batch, i):
  b = batch["x"].shape[0] // N
  return jax.tree.map(lambda a: a[i * b:(i + 1) * b], batch)


def local_rounds(params, batches, H, on_sync, lr_at=lambda t: LR):
  """Reference: N replicas, inner SGD(lr_at(t)) on their slices (t = inner
  steps already taken, counted across rounds), sync every H."""
  local = [params] * N
  grad = jax.jit(jax.grad(loss))
  for t, batch in enumerate(batches, start=1):
    lr = lr_at(t - 1)
    local = [jax.tree.map(lambda p, g: p - lr * g, local[i],
                          grad(local[i], shard(batch, i))) for i in range(N)]
    if t % H == 0:
      local = on_sync(local)
  return local


def tree_mean(trees):
  return jax.tree.map(lambda *x: sum(x) / len(x), *trees)


def close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol,
                               atol=tol)


def run(alg, params, batches):
  s = alg.init(params)
  for b in batches:
    s, m = alg.step(s, b)
  assert np.isfinite(float(m["loss"]))
  return s


def test_diloco_h1_inner_sgd_outer_sgd1_is_data_parallel_sgd(setup):
  mesh, params, batches = setup
  dp = run(data_parallel(loss, optax.sgd(LR), mesh), params, batches)
  dl = diloco(loss, optax.sgd(LR), mesh, 1, outer_optimizer=optax.sgd(1.0))
  close(dl.eval_params(run(dl, params, batches)), dp.params)


def test_diloco_matches_reference_with_nesterov_outer(setup):
  mesh, params, batches = setup
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  box = {"g": params, "s": outer.init(params)}

  def on_sync(local):
    delta = jax.tree.map(lambda g, m: g - m, box["g"], tree_mean(local))
    upd, box["s"] = outer.update(delta, box["s"], box["g"])
    box["g"] = optax.apply_updates(box["g"], upd)
    return [box["g"]] * N

  local_rounds(params, batches, 4, on_sync)
  alg = diloco(loss, optax.sgd(LR), mesh, 4)       # default outer = Nesterov
  close(alg.eval_params(run(alg, params, batches)), box["g"])


def test_diloco_inner_schedule_counts_steps_across_rounds(setup):
  # The inner optimizer state (and its schedule's step count) lives on across
  # rounds: step t of the run uses lr(t), not lr(t mod H).
  mesh, params, batches = setup
  sched = lambda t: LR * 0.8 ** t
  ref = tree_mean(local_rounds(params, batches, 2,
                               lambda l: [tree_mean(l)] * N, sched))
  alg = diloco(loss, optax.sgd(sched), mesh, 2, outer_optimizer=optax.sgd(1.0))
  close(alg.eval_params(run(alg, params, batches)), ref)
  s = alg.init(params)
  for r in range(len(batches) // 2):
    s, _ = alg.round(s, jax.tree.map(lambda *x: np.stack(x),
                                     *batches[2 * r:2 * r + 2]))
  close(alg.eval_params(s), ref)


@pytest.fixture(scope="module")
def diloco_round(setup):
  mesh, params, batches = setup
  alg = diloco(loss, optax.adam(1e-2), mesh, 4)
  stacked = jax.tree.map(lambda *x: np.stack(x), *batches[:4])
  return alg, alg.init(params), stacked


def test_diloco_round_compiles_to_exactly_one_all_reduce(diloco_round):
  alg, state, stacked = diloco_round
  hlo = alg.round.jitted(state).lower(
      state, alg.round.place(stacked)).compile().as_text()
  ops = re.findall(
      r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|"
      r"reduce-scatter)(?:-start)?\(", hlo)
  assert ops == ["all-reduce"], ops


def test_diloco_round_equals_h_steps(diloco_round, setup):
  alg, state, stacked = diloco_round
  _, _, batches = setup
  by_round, _ = alg.round(state, stacked)
  by_step = state
  for b in batches[:4]:
    by_step, _ = alg.step(by_step, b)
  close(alg.eval_params(by_round), alg.eval_params(by_step), 1e-6)
  with pytest.raises(ValueError, match="expected the sync period H=4"):
    alg.round(state, jax.tree.map(lambda x: x[:3], stacked))


def test_diloco_int8_round_bytes_match_the_counter(setup):
  mesh, params, batches = setup
  alg = diloco(loss, optax.sgd(LR), mesh, 2, compressor=gd.int8())
  state = alg.init(params)
  stacked = jax.tree.map(lambda *x: np.stack(x), *batches[:2])
  cb = comm_bytes(alg.round.jitted(state), state, alg.round.place(stacked))
  assert cb.wire_bytes == pytest.approx(alg.bytes_per_step(params) * 2)
  # No f32 all-reduce of the pseudo-gradient: only integer payloads and
  # their f32 block scales move.
  assert not [c for c in cb.compiled if c.op == "all-reduce"]
  new, _ = alg.round(state, stacked)
  ref = diloco(loss, optax.sgd(LR), mesh, 2)
  exact, _ = ref.round(ref.init(params), stacked)
  close(alg.eval_params(new), ref.eval_params(exact), 2e-2)


def test_local_sgd_averages_parameters(setup):
  mesh, params, batches = setup
  ref = local_rounds(params, batches, 3, lambda l: [tree_mean(l)] * N)
  alg = local_sgd(loss, optax.sgd(LR), mesh, 3)
  s = run(alg, params, batches)
  for i in range(N):       # 8 steps: the last 2 are local again
    close(gd.sharding.replica(s.params, i), ref[i])


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_sync_period_below_one_is_rejected(setup, bad):
  mesh, _, _ = setup
  with pytest.raises(ValueError, match="sync_every"):
    diloco(loss, optax.sgd(LR), mesh, bad)


def test_streaming_with_one_fragment_no_overlap_is_diloco(setup):
  mesh, params, batches = setup
  a = diloco(loss, optax.sgd(LR), mesh, 4)
  b = streaming_diloco(loss, optax.sgd(LR), mesh, 4, num_fragments=1,
                       overlap_steps=0, alpha=0.0)
  close(a.eval_params(run(a, params, batches)),
        b.eval_params(run(b, params, batches)))


def test_streaming_fragments_overlap_and_mix_like_reference(setup):
  mesh, params, batches = setup
  H, p, tau, alpha = 4, 2, 1, 0.5
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  flat0, unravel = jax.flatten_util.ravel_pytree(params)
  d = flat0.shape[0]
  bounds = [(0, d // 2), (d // 2, d)]
  g = np.asarray(flat0)
  os_ = [outer.init(jnp.asarray(g[a:b])) for a, b in bounds]
  local = [np.asarray(flat0)] * N
  grad = jax.jit(jax.grad(loss))
  for t, batch in enumerate(batches, start=1):
    local = [l - LR * np.asarray(jax.flatten_util.ravel_pytree(
        grad(unravel(jnp.asarray(l)), shard(batch, i)))[0])
             for i, l in enumerate(local)]
    for j, (a, b) in enumerate(bounds):
      t_sync = ((j + 1) * H // p) % H
      if t % H == t_sync:
        delta = g[a:b] - np.mean([l[a:b] for l in local], axis=0)
        upd, os_[j] = outer.update(jnp.asarray(delta), os_[j],
                                   jnp.asarray(g[a:b]))
        g = g.copy()
        g[a:b] += np.asarray(upd)
      if t % H == (t_sync + tau) % H and t - tau >= (j + 1) * H // p:
        local = [np.concatenate([l[:a], alpha * l[a:b] + (1 - alpha) * g[a:b],
                                 l[b:]]) for l in local]
  alg = streaming_diloco(loss, optax.sgd(LR), mesh, H, num_fragments=p,
                         overlap_steps=tau, alpha=alpha)
  s = run(alg, params, batches)
  close(alg.eval_params(s), unravel(jnp.asarray(g)))
  close(gd.sharding.replica(s.params, 3), unravel(jnp.asarray(local[3])))


def test_streaming_rejects_bad_fragment_settings(setup):
  mesh, _, _ = setup
  with pytest.raises(ValueError, match="divides sync_every"):
    streaming_diloco(loss, optax.sgd(LR), mesh, 6, num_fragments=4)
  with pytest.raises(ValueError, match="overlap_steps"):
    streaming_diloco(loss, optax.sgd(LR), mesh, 4, num_fragments=2,
                     overlap_steps=2)


def test_eager_updates_follow_the_eager_rule(setup):
  mesh, params, batches = setup
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  flat0, unravel = jax.flatten_util.ravel_pytree(params)
  glob = [np.asarray(flat0)] * N
  ost = [outer.init(jnp.asarray(flat0))] * N
  prev_local = [np.zeros_like(flat0)] * N
  prev_mean = np.zeros_like(flat0)
  grad = jax.jit(jax.grad(loss))
  local = [np.asarray(flat0)] * N
  for t, batch in enumerate(batches, start=1):
    local = [l - LR * np.asarray(jax.flatten_util.ravel_pytree(
        grad(unravel(jnp.asarray(l)), shard(batch, i)))[0])
             for i, l in enumerate(local)]
    if t % 2 == 0:
      deltas = [glob[i] - local[i] for i in range(N)]
      mean = np.mean(deltas, axis=0)
      for i in range(N):
        eager = prev_mean + (deltas[i] - prev_local[i]) / N
        upd, ost[i] = outer.update(jnp.asarray(eager), ost[i],
                                   jnp.asarray(glob[i]))
        glob[i] = glob[i] + np.asarray(upd)
      prev_local, prev_mean = deltas, mean
      local = list(glob)
  alg = eager_diloco(loss, optax.sgd(LR), mesh, 2)
  s = run(alg, params, batches)
  close(alg.eval_params(s), unravel(jnp.asarray(np.mean(glob, axis=0))))
  close(gd.sharding.replica(s.params, 5), unravel(jnp.asarray(glob[5])))


def test_co2_stale_outer_step_with_clipping(setup):
  mesh, params, batches = setup
  beta, lr, lam, c = 0.5, 1.0, 2.0, 0.01
  box = {"old": params, "m": jax.tree.map(jnp.zeros_like, params),
         "stale": params}

  def on_sync(local):
    box["m"] = jax.tree.map(
        lambda m, o, a: jnp.clip(beta * m + (o - a) / lam, -c, c),
        box["m"], box["old"], box["stale"])
    box["old"] = jax.tree.map(lambda o, m: o - lr * m, box["old"], box["m"])
    box["stale"] = tree_mean(local)
    return [box["old"]] * N

  local_rounds(params, batches, 2, on_sync)
  alg = co2(loss, optax.sgd(LR), mesh, 2, outer_momentum=beta,
            outer_learning_rate=lr, gap_penalty=lam, clip_threshold=c)
  s = run(alg, params, batches)
  close(alg.eval_params(s), box["old"])
  with pytest.raises(ValueError, match="gap_penalty"):
    co2(loss, optax.sgd(LR), mesh, 2, gap_penalty=0.0)
