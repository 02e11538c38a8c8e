"""Multi-momentum against a hand-written per-cluster reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import optimizers


def test_without_cluster_info_it_is_heavy_ball():
  tx = optimizers.multi_momentum(0.1, num_clusters=4, momentum=0.9)
  ref = optax.sgd(0.1, momentum=0.9)
  p = q = jnp.array([1.0, -2.0])
  s, r = tx.init(p), ref.init(q)
  for t in range(5):
    g = jnp.array([np.sin(t), np.cos(t)], jnp.float32)
    u, s = tx.update(g, s, p)
    v, r = ref.update(g, r, q)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  np.testing.assert_allclose(p, q, rtol=1e-6)


def test_hand_computed_two_clusters():
  beta, w = 0.5, np.array([0.25, 0.75])
  tx = optimizers.scale_by_multi_momentum(2, momentum=beta,
                                          cluster_weights=w)
  s = tx.init(jnp.zeros(1))
  d = np.zeros((2, 1))
  steps = [  # (cluster grads, mask)
      (np.array([[1.0], [2.0]]), np.array([1, 1])),
      (np.array([[4.0], [0.0]]), np.array([3, 0])),  # only cluster 0
      (np.array([[0.0], [-2.0]]), np.array([0, 2])),  # only cluster 1
  ]
  for cg, mask in steps:
    u, s = tx.update(jnp.zeros(1), s, cluster_grads=jnp.asarray(cg),
                     cluster_mask=jnp.asarray(mask))
    for k in range(2):
      if mask[k] > 0:
        d[k] = beta * d[k] + cg[k]
    np.testing.assert_allclose(u, w @ d, rtol=1e-6)
  # stale cluster 0 momentum is kept: d0 = 0.5*1 + 4 = 4.5
  np.testing.assert_allclose(s.momenta[0], [4.5])


def test_per_cluster_grads_are_cluster_means():
  def loss(p, batch):
    return jnp.mean((batch["x"] @ p - batch["y"]) ** 2)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  y = rng.normal(size=(6,)).astype(np.float32)
  ids = np.array([0, 2, 0, 2, 2, 0])
  p = jnp.array([0.1, -0.2, 0.3])
  cg, counts = optimizers.per_cluster_grads(loss, p, {"x": x, "y": y}, ids, 3)
  np.testing.assert_array_equal(counts, [3, 0, 3])
  for k in (0, 2):
    sel = ids == k
    want = jax.grad(loss)(p, {"x": x[sel], "y": y[sel]})
    np.testing.assert_allclose(cg[k], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(cg[1], 0.0)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_clusters": 0}, "num_clusters"),
    ({"momentum": 1.0}, "momentum"),
    ({"num_clusters": 2, "cluster_weights": [0.5, 0.6]}, "cluster_weights")])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optimizers.multi_momentum(0.1, **kwargs)
