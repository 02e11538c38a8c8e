"""FedHyper G / SL / CL against the hypergradient rules, written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import federated as fl

N, D, STEPS = 3, 2, 3


def _quad(params, batch):
  l = 0.5 * jnp.sum((params["x"] - batch["a"]) ** 2, -1)
  return jnp.sum(l * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


A = 4 * np.array([[3.0, -1.0], [4.0, 2.0], [2.5, 0.5]], np.float32)
DATA = fl.as_client_data({"a": A[:, None, :]}, np.ones(N, np.int32))


def _run(alg, rounds):
  state = alg.init({"x": jnp.zeros(D)})
  step = jax.jit(lambda s, k: alg.round(s, DATA, fl.make_round_input(
      np.ones(N, bool), k, STEPS))[0])
  out = []
  for t in range(rounds):
    state = step(state, jax.random.key(t))
    out.append((np.asarray(state.params["x"]), float(state.opt_state.agg)))
  return out


def _client_sgd(x, a, lrs):
  """Local SGD on 0.5·‖y − a‖² with the given per-step rates."""
  y = x.copy()
  for lr in lrs:
    y = y - lr * (y - a)
  return y


@pytest.mark.parametrize("variant", ["G", "SL"])
def test_g_and_sl_follow_the_global_hypergradient(variant):
  lr, rounds = 0.05, 4
  got = _run(fl.fedhyper(_quad, lr, fl.LocalConfig(1, "steps", STEPS), N,
                         variant=variant), rounds)
  x, agg, last = np.zeros(D), 0.0, np.zeros(D)
  for t in range(rounds):
    local = lr if variant == "G" else float(np.clip(lr * (1 + agg),
                                                    0.001, 0.1))
    delta = np.mean([_client_sgd(x, a, [local] * STEPS) for a in A], 0) - x
    agg = agg + float(last @ delta)
    if variant == "G":
      agg = float(np.clip(agg, -0.8, 4.0))
      x = x + (1 + agg) * delta
    else:
      x = x + delta
    last = delta
    np.testing.assert_allclose(got[t][0], x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[t][1], agg, rtol=1e-5, atol=1e-6)
  # the setting moves the rate: all clients pull the same way every round
  assert agg > 0.5
  if variant == "G":
    assert agg == 4.0            # clipped at the upper bound


def test_cl_follows_the_client_hypergradient():
  lr, rounds = 0.3, 3
  got = _run(fl.fedhyper(_quad, lr, fl.LocalConfig(1, "steps", STEPS), N,
                         variant="CL"), rounds)
  c = 0.1 / N
  x, glob = np.zeros(D), np.zeros(D)
  betas = []
  for t in range(rounds):
    ys = []
    for a in A:
      y, beta, last = x.copy(), 1.0, glob
      for s in range(STEPS):
        u = -lr * beta * (y - a)
        y = y + u
        if s >= 1:
          gamma = min(1.1, 1 + c * float(u @ glob) + float(u @ last))
          beta = float(np.clip(gamma * beta, 0.1, 10.0))
          last = u
      ys.append(y)
      betas.append(beta)
    glob = np.mean(ys, 0) - x
    x = x + glob
    np.testing.assert_allclose(got[t][0], x, rtol=1e-5, atol=1e-6)
  assert max(betas) > 1.0 and min(betas) < 1.0   # the rate moved both ways


def test_bad_variant_and_rate():
  with pytest.raises(ValueError, match="variant"):
    fl.fedhyper(_quad, 0.1, fl.LocalConfig(1), N, variant="X")
  with pytest.raises(ValueError, match="local_lr"):
    fl.fedhyper(_quad, -0.1, fl.LocalConfig(1), N)
