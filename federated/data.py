"""Federated data: the FedProx synthetic(α, β) generator, Dirichlet label
partitions and padded per-client shards.

``synthetic(alpha, beta)`` reproduces ``litian96/FedProx``
``data/synthetic_*/generate_synthetic.py`` draw for draw, with numpy's legacy
``RandomState`` seeded (the original is unseeded):

  sizes_k = int(lognormal(4, 2)) + 50;  u_k ~ N(0, α) (α a STANDARD DEVIATION)
  B_k ~ N(0, β);  v_k ~ N(B_k, 1)^60;  W_k ~ N(u_k, 1)^{60×10};  b_k ~ N(u_k, 1)^10
  Σ = diag((j+1)^-1.2);  x ~ N(v_k, Σ);  y = argmax(x·W_k + b_k)
  per user: shuffle, first 90% train / last 10% test.

The IID variant (``generate_iid.py``) uses v_k = 0 and one shared W, b ~ N(0, 1).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gradax.federated.core import ClientData, as_client_data


class FederatedSplit(NamedTuple):
  """Per-client train shards (padded ``ClientData``) plus test data.

  Attributes:
    train: ``ClientData`` with fields ``x`` ``[N, M, d]`` and ``y`` ``[N, M]``.
    test: ``ClientData`` of the per-client test examples (same layout).
  """
  train: ClientData
  test: ClientData


def _check_std(name, v):
  if not float(v) >= 0:
    raise ValueError(f"{name} must be >= 0 (a standard deviation), got {v}.")


def synthetic_raw(alpha: float, beta: float, iid: bool = False,
                  num_users: int = 30, dim: int = 60, num_classes: int = 10,
                  seed: int = 0):
  """Per-user ``(x_k, y_k)`` lists, before the train/test split.

  Args:
    alpha: std of u_k (model heterogeneity).
    beta: std of B_k (feature heterogeneity).
    iid: the IID variant (α and β unused).
    num_users, dim, num_classes: 30, 60, 10 in the paper.
    seed: ``numpy.random.RandomState`` seed.

  Returns:
    ``(xs, ys)``: lists of ``[n_k, dim]`` float32 and ``[n_k]`` int32 arrays.
  """
  _check_std("alpha", alpha)
  _check_std("beta", beta)
  if int(num_users) < 1:
    raise ValueError(f"num_users must be >= 1, got {num_users}.")
  rs = np.random.RandomState(seed)
  sizes = rs.lognormal(4, 2, num_users).astype(int) + 50
  cov = np.diag(np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2))
  xs, ys = [], []
  if iid:
    mean_x = np.zeros((num_users, dim))
    w_all = rs.normal(0, 1, (dim, num_classes))
    b_all = rs.normal(0, 1, num_classes)
    for i in range(num_users):
      x = rs.multivariate_normal(mean_x[i], cov, sizes[i])
      xs.append(x)
      ys.append(np.argmax(x @ w_all + b_all, axis=1))
  else:
    mean_w = rs.normal(0, alpha, num_users)
    big_b = rs.normal(0, beta, num_users)
    mean_x = np.stack([rs.normal(big_b[i], 1, dim) for i in range(num_users)])
    for i in range(num_users):
      w = rs.normal(mean_w[i], 1, (dim, num_classes))
      b = rs.normal(mean_w[i], 1, num_classes)
      x = rs.multivariate_normal(mean_x[i], cov, sizes[i])
      xs.append(x)
      ys.append(np.argmax(x @ w + b, axis=1))
  # argmax(softmax(z)) == argmax(z); the split shuffle below reuses rs
  return ([x.astype(np.float32) for x in xs],
          [y.astype(np.int32) for y in ys])


def split_train_test(xs, ys, train_fraction: float = 0.9, seed: int = 0):
  """Shuffles each user's examples and keeps the first ⌊0.9·n_k⌋ for training."""
  rs = np.random.RandomState(seed + 1)
  tr, te = [], []
  for x, y in zip(xs, ys):
    p = rs.permutation(len(y))
    k = int(train_fraction * len(y))
    tr.append((x[p[:k]], y[p[:k]]))
    te.append((x[p[k:]], y[p[k:]]))
  return tr, te


def pad_clients(shards, min_length: int = 1) -> ClientData:
  """Pads per-client ``(x, y)`` shards into ``ClientData``.

  Args:
    shards: list of ``(x [n_k, ...], y [n_k])``; ``n_k`` may be 0.
    min_length: lower bound of the padded length M.

  Returns:
    ``ClientData`` with ``examples={"x": [N, M, ...], "y": [N, M]}``.
  """
  if not shards:
    raise ValueError("shards is empty; give at least one client.")
  m = max(min_length, max(len(y) for _, y in shards))
  x0 = np.asarray(shards[0][0])
  xs = np.zeros((len(shards), m) + x0.shape[1:], np.float32)
  ys = np.zeros((len(shards), m), np.int32)
  n = np.zeros(len(shards), np.int32)
  for i, (x, y) in enumerate(shards):
    k = len(y)
    n[i] = k
    if k:
      xs[i, :k] = x
      ys[i, :k] = y
  return as_client_data({"x": xs, "y": ys}, n)


def synthetic(alpha: float, beta: float, iid: bool = False,
              num_users: int = 30, seed: int = 0) -> FederatedSplit:
  """FedProx synthetic(α, β) as padded train/test ``ClientData``.

  Example:
    >>> split = synthetic(1.0, 1.0, seed=0)
    >>> split.train.num_examples.shape
    (30,)
  """
  xs, ys = synthetic_raw(alpha, beta, iid, num_users=num_users, seed=seed)
  tr, te = split_train_test(xs, ys, seed=seed)
  return FederatedSplit(pad_clients(tr), pad_clients(te))


def dirichlet_partition(labels, num_clients: int, alpha: float,
                        seed: int = 0):
  """Label-Dirichlet partition of a labelled dataset (as ``IBM/fedau``).

  Client n draws a label distribution q_n ~ Dir(α·1_C); the (shuffled)
  indices of each label c are cut into consecutive pieces with sizes
  proportional to q_{n,c} / Σ_n q_{n,c}.

  Args:
    labels: ``[num_examples]`` integer labels.
    num_clients: N ≥ 1.
    alpha: concentration α > 0 (small α: each client sees few labels).
    seed: seed.

  Returns:
    ``(indices, label_dist)``: a list of N index arrays and the ``[N, C]``
    realised label distributions (rows of empty clients are 0).
  """
  labels = np.asarray(labels).astype(np.int64)
  if int(num_clients) < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  if not float(alpha) > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}.")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  q = rng.dirichlet(alpha * np.ones(len(classes)), num_clients)
  col = q.sum(axis=0)
  parts = [[] for _ in range(num_clients)]
  for ci, c in enumerate(classes):
    idx = rng.permutation(np.flatnonzero(labels == c))
    cuts = np.round(len(idx) * np.cumsum(q[:, ci]) / col[ci]).astype(int)
    start = 0
    for n in range(num_clients):
      parts[n].append(idx[start:cuts[n]])
      start = cuts[n]
  indices = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
  dist = np.zeros((num_clients, len(classes)))
  for n, ix in enumerate(indices):
    if len(ix):
      dist[n] = np.array([(labels[ix] == c).mean() for c in classes])
  return indices, dist


def shards_from_indices(x, y, indices):
  """``[(x[ix], y[ix]) for ix in indices]``."""
  x, y = np.asarray(x), np.asarray(y)
  return [(x[ix], y[ix]) for ix in indices]


def pooled(data: ClientData):
  """All real examples of all clients, concatenated: ``(x, y)``."""
  xs = np.asarray(data.examples["x"])
  ys = np.asarray(data.examples["y"])
  n = np.asarray(data.num_examples)
  return (np.concatenate([xs[i, :n[i]] for i in range(len(n))]),
          np.concatenate([ys[i, :n[i]] for i in range(len(n))]))
