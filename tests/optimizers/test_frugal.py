"""FRUGAL against a plain NumPy reference of its rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax import optimizers as gx


def adam_dir(gs, b1, b2, eps):
  """Bias-corrected Adam direction after the gradients ``gs`` (one restart)."""
  m = v = 0.0
  for g in gs:
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
  t = len(gs)
  return (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)


B1, B2, EPS = 0.9, 0.99, 1e-8


def test_blocks_cycle_and_restart_adam_and_use_sgd_outside():
  rng = np.random.default_rng(0)
  gs = [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(3)]
  tx = gx.scale_by_frugal(density=0.5, update_gap=2, selection="blocks",
                          inactive_scale=0.5, state_free="sgd", b1=B1, b2=B2,
                          eps=EPS)
  state = tx.init(jnp.zeros((4, 2)))
  upd = jax.jit(tx.update)
  outs = []
  for g in gs:
    u, state = upd(jnp.asarray(g), state)
    outs.append(np.asarray(u))
  # Steps 1-2 keep rows 0-1 state-full, step 3 moves to rows 2-3 afresh.
  np.testing.assert_allclose(outs[0][:2], adam_dir([gs[0][:2]], B1, B2, EPS),
                             rtol=1e-5)
  np.testing.assert_allclose(outs[0][2:], 0.5 * gs[0][2:], rtol=1e-6)
  np.testing.assert_allclose(
      outs[1][:2], adam_dir([gs[0][:2], gs[1][:2]], B1, B2, EPS), rtol=1e-5)
  np.testing.assert_allclose(outs[2][2:], adam_dir([gs[2][2:]], B1, B2, EPS),
                             rtol=1e-5)
  np.testing.assert_allclose(outs[2][:2], 0.5 * gs[2][:2], rtol=1e-6)


def test_svd_projection_splits_adam_and_sign_sgd():
  rng = np.random.default_rng(1)
  g1, g2 = (rng.normal(size=(6, 3)).astype(np.float32) for _ in range(2))
  tx = gx.scale_by_frugal(density=0.34, update_gap=100, selection="svd",
                          inactive_scale=0.1, b1=B1, b2=B2, eps=EPS)
  state = tx.init(jnp.zeros((6, 3)))
  _, state = tx.update(jnp.asarray(g1), state)
  u, _ = tx.update(jnp.asarray(g2), state)
  p = np.linalg.svd(g1.astype(np.float64))[0][:, :1]  # rank round(.34*3)=1
  want = (p @ adam_dir([p.T @ g1, p.T @ g2], B1, B2, EPS)
          + 0.1 * np.sign(g2 - p @ (p.T @ g2)))
  np.testing.assert_allclose(np.asarray(u), want, rtol=1e-4, atol=1e-5)


def test_vectors_are_state_full_adam():
  g = jnp.array([0.5, -2.0, 3.0])
  tx = gx.scale_by_frugal(density=0.25, b1=B1, b2=B2, eps=EPS)
  u, _ = tx.update(g, tx.init(jnp.zeros(3)))
  np.testing.assert_allclose(u, adam_dir([np.asarray(g)], B1, B2, EPS),
                             rtol=1e-6)


def test_density_quarter_blocks_state_is_two_bytes_per_matrix_param():
  state = gx.scale_by_frugal(density=0.25).init(jnp.zeros((64, 256)))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert nbytes == 2 * (64 * 64 * 4) + 4  # moments of 64 of 256 rows; count
  assert (nbytes - 4) / (64 * 256) == 2.0


@pytest.mark.parametrize("kw,name", [
    (dict(density=0.0), "density"), (dict(density=1.01), "density"),
    (dict(update_gap=0), "update_gap"), (dict(selection="cols"), "selection")])
def test_bad_input_names_the_argument(kw, name):
  with pytest.raises(ValueError, match=name):
    gx.frugal(1e-3, **kw)
