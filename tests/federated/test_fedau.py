"""FedAU: the reference's interval rule, and the quadratic closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import federated as fl
from gradax.federated.aggregators import AggregatorInput
from gradax.federated.fedau import fedau_weights


def _reference_fedau(participation, updates, cutoff):
  """Transcription of IBM/fedau main.py (-weighting adaptive), per client."""
  t_max, n = participation.shape
  since = [0] * n
  intervals = [[] for _ in range(n)]
  aggs, weights = [], []
  for t in range(t_max):
    acc = np.zeros(updates.shape[2:])
    w_t = np.full(n, np.nan)
    for c in range(n):
      if participation[t, c]:
        w = np.mean(intervals[c]) if intervals[c] else 1.0
        w_t[c] = w
        acc = acc + w * updates[t, c]
        intervals[c].append(since[c] + 1)
        since[c] = 0
      else:
        since[c] += 1
        if since[c] >= cutoff:
          intervals[c].append(since[c])
          since[c] = 0
    aggs.append(acc / n)                               # total N, always
    weights.append(w_t)
  return np.array(aggs), np.array(weights), since


@pytest.mark.parametrize("cutoff", [1, 3, 100000])
def test_fedau_aggregator_matches_reference(cutoff):
  rng = np.random.default_rng(cutoff)
  t_max, n, d = 30, 6, 2
  probs = np.array([0.05, 0.2, 0.4, 0.6, 0.9, 1.0])
  part = fl.participation.Bernoulli(probs).sample(t_max, seed=cutoff)
  updates = rng.normal(size=(t_max, n, d)).astype(np.float32)
  agg = fl.fedau_aggregator(cutoff)
  ref_aggs, ref_w, ref_since = _reference_fedau(part, updates, cutoff)

  @jax.jit
  def run(state):
    def body(s, xs):
      p, u = xs
      ids = jnp.arange(n, dtype=jnp.int32)     # all slots, invalid ones zero
      u = jnp.where(p[:, None], u, 0.0)
      out, s = agg.apply(AggregatorInput({"u": u}, ids, p,
                                         jnp.ones(n, jnp.int32), p), s)
      return s, out["u"]
    return jax.lax.scan(body, state, (jnp.asarray(part), jnp.asarray(updates)))

  state, outs = run(agg.init(None, n))
  np.testing.assert_allclose(outs, ref_aggs, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state.since, ref_since)
  # every weight lies in [1, K]
  w = np.asarray(fedau_weights(state))
  assert np.all((w >= 1) & (w <= cutoff))


def test_first_participation_weight_is_one_and_mean_of_intervals():
  agg = fl.fedau_aggregator(100000)
  n = 2
  s = agg.init(None, n)
  # client 0: absent, present, present  -> weights 1 (no history), then 2
  pattern = np.array([[0, 1], [1, 1], [1, 0]], bool)
  got = []
  for p in pattern:
    p = jnp.asarray(p)
    out, s = agg.apply(AggregatorInput({"u": jnp.ones((n, 1))},
                                       jnp.arange(n), p, jnp.ones(n), p), s)
    got.append(float(out["u"][0]))
  # round 1: only client 1 (w=1) -> 1/2; round 2: c0 w=1, c1 w=1 -> 1;
  # round 3: c0 w = mean([2]) = 2 -> 2/2
  assert got == [0.5, 1.0, 1.0]
  np.testing.assert_array_equal(s.interval_sum, [3.0, 2.0])


def test_bad_cutoff():
  for k in (0, -3, 1.5):
    with pytest.raises(ValueError, match="cutoff"):
      fl.fedau_aggregator(k)


def _quad_loss(params, batch):
  l = 0.5 * jnp.sum((params["x"] - batch["a"]) ** 2, -1)
  return jnp.sum(l * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def test_quadratic_closed_form_optima():
  """FedAU -> mean of client optima; participant averaging -> the optimum
  weighted by q_n = E[1{n in S}/|S|] (computed from the same masks)."""
  n, d, t_max = 12, 2, 1500
  rng = np.random.default_rng(0)
  a = (3 * rng.normal(size=(n, d))).astype(np.float32)
  probs = np.linspace(0.1, 0.9, n)
  data = fl.as_client_data({"a": a[:, None, :]}, np.ones(n, np.int32))
  part = fl.participation.Bernoulli(probs).sample(t_max, seed=1)
  local = fl.LocalConfig(1, "steps", 2)
  algs = {
      "fedau": fl.fedau(_quad_loss, optax.sgd(0.2), local, n, server_lr=0.2),
      "participants": fl.fedavg(_quad_loss, optax.sgd(0.2), local, n,
                                server_lr=0.2,
                                aggregator=fl.participant_mean()),
  }
  keys = jax.random.split(jax.random.key(0), t_max)
  tail = {}
  for name, alg in algs.items():
    def body(s, xs, alg=alg):
      s, _ = alg.round(s, data, fl.RoundInput(xs[0], xs[1],
                                              jnp.full((n,), 2, jnp.int32)))
      return s, s.params["x"]
    _, traj = jax.jit(lambda s, body=body: jax.lax.scan(
        body, s, (jnp.asarray(part), keys)))(alg.init({"x": jnp.zeros(d)}))
    tail[name] = np.asarray(traj[t_max // 3:]).mean(0)
  mean_opt = a.mean(0)
  q = (part / np.maximum(part.sum(1, keepdims=True), 1)).mean(0)
  weighted_opt = (q[:, None] * a).sum(0) / q.sum()
  gap = np.linalg.norm(mean_opt - weighted_opt)
  assert gap > 0.5                                     # the test can tell them apart
  assert np.linalg.norm(tail["fedau"] - mean_opt) < 0.15 * gap
  assert np.linalg.norm(tail["participants"] - weighted_opt) < 0.15 * gap
  assert np.linalg.norm(tail["participants"] - mean_opt) > 0.7 * gap
