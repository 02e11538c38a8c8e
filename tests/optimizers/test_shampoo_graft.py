"""Shampoo's factored (Adafactor) graft: a NumPy reference, state layout."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np

sh = importlib.import_module("gradax.optimizers.shampoo")

B2, EPS = 0.9, 1e-8


def _np_adafactor_dirs(grads, beta=B2, eps=EPS):
  """Adafactor's factored second moment (Shazeer & Stern 2018, Alg. 4, no
  ε1) with Adam's bias correction, over the last two dims, in float64."""
  g0 = np.asarray(grads[0], np.float64)
  r = np.zeros(g0.shape[:-1])
  c = np.zeros(g0.shape[:-2] + g0.shape[-1:])
  out = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    r = beta * r + (1 - beta) * (g * g).sum(-1)
    c = beta * c + (1 - beta) * (g * g).sum(-2)
    v = r[..., :, None] * c[..., None, :] / r.sum(-1)[..., None, None]
    out.append(g / (np.sqrt(v / (1 - beta ** t)) + eps))
  return out, r, c


def _np_adam_dirs(grads, beta=B2, eps=EPS):
  nu = np.zeros(np.shape(grads[0]))
  out = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    nu = beta * nu + (1 - beta) * g * g
    out.append(g / (np.sqrt(nu / (1 - beta ** t)) + eps))
  return out


def _random_grads(shapes, steps, seed):
  rng = np.random.default_rng(seed)
  # Rows and columns of different scales, so the factored estimate differs
  # from a constant and from the exact second moment.
  out = []
  for _ in range(steps):
    g = {}
    for k, s in shapes.items():
      scale = np.exp(rng.normal(size=s[-1:])) * np.exp(
          rng.normal(size=s[:-1] + (1,)))
      g[k] = (rng.normal(size=s) * scale).astype(np.float32)
    out.append(g)
  return out


SHAPES = {"w": (6, 5), "b": (7,)}


def _run(tx, grads):
  params = {k: jnp.zeros(np.shape(v), jnp.float32) for k, v in grads[0].items()}
  state = tx.init(params)
  upd = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = upd(jax.tree.map(jnp.asarray, g), state, params)
    outs.append(jax.tree.map(np.asarray, u))
  return outs, state


def test_factored_graft_direction_matches_numpy_reference():
  # Shampoo never starts and there is no momentum, so the output is the graft
  # direction itself: factored for the matrix, exact Adam for the vector.
  grads = _random_grads(SHAPES, 4, seed=0)
  tx = sh.scale_by_shampoo(beta1=0.0, graft_type="adafactor", graft_beta2=B2,
                           diagonal_epsilon=EPS,
                           start_preconditioning_step=100)
  ours, state = _run(tx, grads)
  ref, r, c = _np_adafactor_dirs([g["w"] for g in grads])
  for t in range(4):
    np.testing.assert_allclose(ours[t]["w"], ref[t], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(state.nu_row["w"], r, rtol=1e-5)
  np.testing.assert_allclose(state.nu_col["w"], c, rtol=1e-5)
  ref = _np_adam_dirs([g["b"] for g in grads])
  for t in range(4):
    np.testing.assert_allclose(ours[t]["b"], ref[t], rtol=2e-5, atol=1e-6)


def test_factored_second_moment_of_a_3d_tensor_uses_the_last_two_dims():
  # (4, 3, 5): an independent 3 x 5 factorisation per leading index.
  grads = [g["c"] for g in _random_grads({"c": (4, 3, 5)}, 3, seed=3)]
  r, c = jnp.zeros((4, 3)), jnp.zeros((4, 5))
  ref_r, ref_c = np.zeros((4, 3)), np.zeros((4, 5))
  for g in grads:
    v, r, c = sh.factored_second_moment(jnp.asarray(g), r, c, B2)
    g = np.asarray(g, np.float64) ** 2
    ref_r = B2 * ref_r + (1 - B2) * g.sum(-1)
    ref_c = B2 * ref_c + (1 - B2) * g.sum(-2)
    for i in range(4):
      want = np.outer(ref_r[i], ref_c[i]) / ref_r[i].sum()
      np.testing.assert_allclose(v[i], want, rtol=1e-5)


def test_factored_graft_sets_the_shampoo_step_norm():
  # Once Shampoo runs, each layer's update is the ungrafted Shampoo direction
  # rescaled to the norm of the factored graft direction (the layer's norm,
  # across its 2 x 2 blocks of 4 x 4, padded).
  grads = _random_grads({"w": (6, 5)}, 3, seed=1)
  kw = dict(beta1=0.0, graft_beta2=B2, diagonal_epsilon=EPS,
            start_preconditioning_step=0, precondition_every=1, block_size=4)
  ours, _ = _run(sh.scale_by_shampoo(graft_type="adafactor", **kw), grads)
  plain, _ = _run(sh.scale_by_shampoo(graft_type="none", **kw), grads)
  ref, _, _ = _np_adafactor_dirs([g["w"] for g in grads])
  for t in range(3):
    d = plain[t]["w"]
    want = d * np.linalg.norm(ref[t]) / np.linalg.norm(d)
    np.testing.assert_allclose(ours[t]["w"], want, rtol=1e-4, atol=1e-6)


def test_factored_equals_adam_graft_for_rank_one_squares():
  # If every gradient is s_t * x yᵀ, the EMA of g² is rank one, so
  # Adafactor's estimate r_i c_j / Σr is exact and the two grafts agree.
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(6, 1)), rng.normal(size=(1, 5))
  grads = [{"w": (s * x * y).astype(np.float32)}
           for s in rng.uniform(0.5, 2.0, size=4)]
  kw = dict(graft_beta2=B2, start_preconditioning_step=2,
            precondition_every=1)
  a, _ = _run(sh.scale_by_shampoo(graft_type="adafactor", **kw), grads)
  b, _ = _run(sh.scale_by_shampoo(graft_type="adam", **kw), grads)
  for ua, ub in zip(a, b):
    np.testing.assert_allclose(ua["w"], ub["w"], rtol=1e-4, atol=1e-6)


def test_factored_state_shapes_and_bytes():
  params = {"w": jnp.zeros((10, 12)), "c": jnp.zeros((4, 3, 5)),
            "b": jnp.zeros((7,)), "big": jnp.zeros((20, 30))}
  # "big" has both dims above the skip size: a diagonal leaf, so it keeps
  # the exact elementwise nu (its graft direction is its update).
  tx = sh.scale_by_shampoo(graft_type="adafactor", block_size=8,
                           merge_small_dims_block_size=1,
                           skip_preconditioning_dim_size_gt=16)
  st = tx.init(params)
  shapes = lambda t: {k: v.shape for k, v in t.items()}
  assert shapes(st.nu) == {"w": (0,), "c": (0,), "b": (7,), "big": (20, 30)}
  assert shapes(st.nu_row) == {"w": (10,), "c": (4, 3), "b": (0,),
                               "big": (0,)}
  assert shapes(st.nu_col) == {"w": (12,), "c": (4, 5), "b": (0,),
                               "big": (0,)}
  tx_bytes = sh.state_nbytes(st)
  adam = sh.state_nbytes(sh.scale_by_shampoo(
      graft_type="adam", block_size=8, merge_small_dims_block_size=1,
      skip_preconditioning_dim_size_gt=16).init(params))
  # Adam's full nu of w and c (120 + 60 floats) becomes 22 + 32 floats.
  assert adam - tx_bytes == 4 * ((120 + 60) - (22 + 32))


def test_factored_graft_zero_and_nonfinite_gradients():
  tx = sh.scale_by_shampoo(graft_type="adafactor",
                           start_preconditioning_step=0, precondition_every=1)
  params = {"a": jnp.ones((4, 4)), "z": jnp.ones((3, 5))}
  state = tx.init(params)
  upd = jax.jit(tx.update)
  g = {"a": jnp.eye(4), "z": jnp.zeros((3, 5))}
  u, state = upd(g, state, params)
  # An all-zero layer: zero row sums, zero update, nothing non-finite.
  assert np.all(np.asarray(u["z"]) == 0)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(
      (u, state)))
  bad = {"a": g["a"].at[0, 0].set(jnp.inf), "z": g["z"]}
  _, state2 = upd(bad, state, params)
  for a, b in zip(jax.tree.leaves((state2.nu_row, state2.nu_col)),
                  jax.tree.leaves((state.nu_row, state.nu_col))):
    np.testing.assert_array_equal(a, b)
