"""Participation models and federated data generators."""

import numpy as np
import pytest

from gradax import federated as fl
from gradax.federated import data as fdata
from gradax.federated import participation as fpart


def test_models_are_seeded_and_reproducible():
  p = np.linspace(0.1, 0.9, 6)
  for m in (fpart.Bernoulli(p), fpart.Markov(p), fpart.Cyclic(p, 10),
            fpart.UniformSample(6, 2)):
    a, b, c = m.sample(50, 3), m.sample(50, 3), m.sample(50, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (50, 6) and a.dtype == bool


def test_long_run_frequencies_match_p():
  p = np.array([0.05, 0.2, 0.5, 0.9])
  t = 20000
  np.testing.assert_allclose(fpart.Bernoulli(p).sample(t, 0).mean(0), p,
                             atol=0.015)
  # Markov: stationary probability p_n (to_inactive = a (1/p - 1))
  np.testing.assert_allclose(fpart.Markov(p, 0.05).sample(t, 0).mean(0), p,
                             atol=0.05)
  u = fpart.UniformSample(10, 3).sample(500, 0)
  assert np.all(u.sum(1) == 3)
  assert np.all(fpart.Full(4).sample(3) )


def test_cyclic_pattern():
  p = np.array([0.2, 0.5])
  c = fpart.Cyclic(p, cycle=10).sample(100, seed=1)
  np.testing.assert_allclose(c.mean(0), p, atol=0.03)
  for n, k in ((0, 2), (1, 5)):
    col = c[:, n].astype(int)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, col, 0])))[::2]
    assert np.all(runs[:-1] == k)                    # active k rounds in a row


def test_markov_rescales_transitions():
  m = fpart.Markov(np.array([0.02]), to_active=0.05)  # 0.05*(49) > 1
  assert m.to_inactive[0] == 1.0
  assert m.to_active[0] == pytest.approx(0.05 / (0.05 * 49))


def test_bad_participation_probabilities():
  for bad in ([0.0, 0.5], [0.5, 1.5], [-1.0], [np.nan, 0.5]):
    for cls in (fpart.Bernoulli, fpart.Markov, fpart.Cyclic):
      with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        cls(bad)
  with pytest.raises(ValueError, match="m must lie"):
    fpart.UniformSample(5, 6)


def test_label_correlated_probs():
  q = np.eye(4)[[0, 0, 1, 2, 3, 3]]
  p = fpart.label_correlated_probs(q, mean=0.1, floor=0.02, seed=0)
  assert np.all((p >= 0.02) & (p <= 1))
  assert p[0] == p[1] and p[4] == p[5]               # same labels, same p


def test_fedprox_stragglers_protocol():
  sel, act, work = fpart.fedprox_stragglers(30, 10, 0.9, 20, 50, seed=0)
  assert np.all(sel.sum(1) == 10) and np.all(act.sum(1) == 1)
  assert np.all(act <= sel)
  assert np.all(work[act] == 20)
  strag = sel & ~act
  assert np.all((work[strag] >= 1) & (work[strag] <= 19))
  assert np.all(work[~sel] == 0)


def _reference_synthetic(alpha, beta, seed, num_users=30):
  """The FedProx generator's draw order, written out with RandomState."""
  rs = np.random.RandomState(seed)
  sizes = rs.lognormal(4, 2, num_users).astype(int) + 50
  mean_w = rs.normal(0, alpha, num_users)
  big_b = rs.normal(0, beta, num_users)
  cov = np.diag([(j + 1) ** -1.2 for j in range(60)])
  mean_x = np.zeros((num_users, 60))
  for i in range(num_users):
    mean_x[i] = rs.normal(big_b[i], 1, 60)
  xs, ys = [], []
  for i in range(num_users):
    w = rs.normal(mean_w[i], 1, (60, 10))
    b = rs.normal(mean_w[i], 1, 10)
    xx = rs.multivariate_normal(mean_x[i], cov, sizes[i])
    yy = np.zeros(sizes[i])
    for j in range(sizes[i]):
      z = xx[j] @ w + b
      yy[j] = np.argmax(np.exp(z) / np.sum(np.exp(z)))
    xs.append(xx)
    ys.append(yy)
  return xs, ys


def test_synthetic_matches_reference_generator():
  xs, ys = fdata.synthetic_raw(1.0, 1.0, seed=7, num_users=5)
  rx, ry = _reference_synthetic(1.0, 1.0, seed=7, num_users=5)
  for a, b, c, d in zip(xs, rx, ys, ry):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(c, d.astype(int))
  split = fdata.synthetic(1.0, 1.0, seed=7, num_users=5)
  n_tr = np.asarray(split.train.num_examples)
  n_te = np.asarray(split.test.num_examples)
  np.testing.assert_array_equal(n_tr, [int(0.9 * len(y)) for y in ys])
  np.testing.assert_array_equal(n_tr + n_te, [len(y) for y in ys])
  assert min(len(y) for y in ys) >= 50


def test_synthetic_iid_shares_one_model():
  xs, ys = fdata.synthetic_raw(0, 0, iid=True, seed=0, num_users=4)
  # IID: features centred at 0 for every user
  assert all(abs(float(x.mean())) < 0.2 for x in xs)
  with pytest.raises(ValueError, match="alpha"):
    fdata.synthetic_raw(-1.0, 1.0)


def test_dirichlet_partition_is_a_partition():
  labels = np.repeat(np.arange(5), 40)
  idx, dist = fdata.dirichlet_partition(labels, 8, 0.3, seed=0)
  allidx = np.concatenate(idx)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(200))
  for ix, q in zip(idx, dist):
    if len(ix):
      np.testing.assert_allclose(q, np.bincount(labels[ix], minlength=5)
                                 / len(ix))
  # small alpha concentrates labels: most clients see few labels
  idx2, dist2 = fdata.dirichlet_partition(labels, 8, 0.01, seed=0)
  assert np.mean((dist2 > 0).sum(1)) < np.mean((dist > 0).sum(1))
  with pytest.raises(ValueError, match="alpha"):
    fdata.dirichlet_partition(labels, 8, 0.0)


def test_pad_clients_with_empty_shard():
  shards = [(np.ones((3, 2)), np.array([1, 2, 3])), (np.zeros((0, 2)),
                                                     np.array([], int))]
  d = fdata.pad_clients(shards)
  assert d.examples["x"].shape == (2, 3, 2)
  np.testing.assert_array_equal(d.num_examples, [3, 0])
  x, y = fdata.pooled(d)
  np.testing.assert_array_equal(y, [1, 2, 3])
