"""Natural GaLore: the Woodbury step against a dense inverse, and one step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import optimizers as gx


def test_woodbury_matches_dense_inverse_fisher_with_ring_wrap():
  rng = np.random.default_rng(0)
  gs = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(4)]
  lam, s = 0.5, 2
  tx = gx.scale_by_woodbury_fisher(history_size=s, damping=lam)
  state = tx.init(jnp.zeros((3, 2)))
  for t, g in enumerate(gs, start=1):
    u, state = tx.update(jnp.asarray(g), state)
    hist = np.stack([x.reshape(-1) for x in gs[max(0, t - s):t]])
    n = hist.shape[0]
    fisher = lam * np.eye(6) + hist.T @ hist / n
    want = np.linalg.solve(fisher, g.reshape(-1)).reshape(3, 2)
    np.testing.assert_allclose(u, want, rtol=1e-4, atol=1e-5)


def test_one_step_is_projected_natural_adam():
  g = np.random.default_rng(1).normal(size=(4, 2)).astype(np.float32)
  lam, eps = 0.3, 1e-8
  tx = gx.scale_by_natural_galore(rank=1, history_size=3, damping=lam,
                                  eps=eps)
  u, _ = tx.update(jnp.asarray(g), tx.init(jnp.zeros((4, 2))))
  p = np.linalg.svd(g.astype(np.float64))[0][:, :1]
  r = (p.T @ g).reshape(-1)
  nat = np.linalg.solve(lam * np.eye(2) + np.outer(r, r), r)
  want = p @ (nat / (np.abs(nat) + eps))[None, :]   # Adam's first step
  np.testing.assert_allclose(u, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw,name", [
    (dict(history_size=0), "history_size"), (dict(damping=0.0), "damping"),
    (dict(rank=0), "rank")])
def test_bad_input_names_the_argument(kw, name):
  with pytest.raises(ValueError, match=name):
    gx.natural_galore(1e-3, **kw)


def test_rank_above_matrix_dimension_raises_at_init():
  with pytest.raises(ValueError, match="rank=3"):
    gx.natural_galore(1e-3, rank=3).init({"w": jnp.zeros((2, 9))})
