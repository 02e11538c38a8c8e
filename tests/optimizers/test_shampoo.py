"""Tests for gradax.optimizers.shampoo (blocked Shampoo with grafting)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gradax import distributed
# The package re-exports the function `shampoo`, which shadows the module.
sh = importlib.import_module("gradax.optimizers.shampoo")


# ---------------------------------------------------------------------------
# A plain dense full-matrix Shampoo in float64 NumPy (the reference).
# ---------------------------------------------------------------------------


def _np_inv_root(a, p, eps):
  w, q = np.linalg.eigh(0.5 * (a + a.T))
  w = np.maximum(w, 0.0) + eps * w.max()
  return (q * w ** (-1.0 / p)) @ q.T


def _unfold(g, j):
  return np.moveaxis(g, j, 0).reshape(g.shape[j], -1)


def _mode(g, m, j):
  return np.moveaxis(np.tensordot(m, np.moveaxis(g, j, 0), axes=(1, 0)), 0, j)


class DenseShampoo:
  """Full-matrix Shampoo on one tensor (no blocking), float64.

  Statistics EMA (beta2) or sum (beta2 == 1), roots every `every` steps from
  step `start - 1`, graft none/sgd/adam, heavy-ball EMA momentum with bias
  correction.
  """

  def __init__(self, shape, beta2=0.9, eps=1e-4, every=1, start=0,
               graft="none", beta1=0.0, graft_beta2=0.99, diag_eps=1e-8):
    self.stats = [np.zeros((d, d)) for d in shape]
    self.roots = [np.eye(d) for d in shape]
    self.k = len(shape)
    self.beta2, self.eps, self.every, self.start = beta2, eps, every, start
    self.graft, self.beta1, self.gb2, self.de = graft, beta1, graft_beta2, diag_eps
    self.nu = np.zeros(shape)
    self.mu = np.zeros(shape)
    self.t = 0

  def step(self, g):
    g = np.asarray(g, np.float64)
    t = self.t
    for j in range(self.k):
      gg = _unfold(g, j) @ _unfold(g, j).T
      if self.beta2 == 1.0:
        self.stats[j] = self.stats[j] + gg
      else:
        self.stats[j] = self.beta2 * self.stats[j] + (1 - self.beta2) * gg
    first = max(self.start - 1, 0)
    if t >= first and (t - first) % self.every == 0:
      self.roots = [_np_inv_root(s, 2 * self.k, self.eps) for s in self.stats]
    d = g
    for j in range(self.k):
      d = _mode(d, self.roots[j], j)
    if self.graft == "adam":
      self.nu = self.gb2 * self.nu + (1 - self.gb2) * g * g
      diag = g / (np.sqrt(self.nu / (1 - self.gb2 ** (t + 1))) + self.de)
    else:
      diag = g
    if self.graft == "none":
      u = d
    else:
      u = d * np.linalg.norm(diag) / np.linalg.norm(d)
    if t < self.start:
      u = diag
    if self.beta1 > 0:
      self.mu = self.beta1 * self.mu + (1 - self.beta1) * u
      u = self.mu / (1 - self.beta1 ** (t + 1))
    self.t += 1
    return u


def _grads(shape, n, seed):
  rng = np.random.default_rng(seed)
  # Correlated gradients so the factors are far from identity.
  mix = [rng.normal(size=(d, d)) for d in shape]
  out = []
  for _ in range(n):
    g = rng.normal(size=shape)
    for j, m in enumerate(mix):
      g = _mode(g, m, j)
    out.append(g.astype(np.float32))
  return out


def _run_gradax(tx, grads, param_shape):
  params = jnp.zeros(param_shape, jnp.float32)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  outs = []
  for g in grads:
    u, state = upd(jnp.asarray(g), state, params)
    outs.append(np.asarray(u))
  return outs, state


def _assert_close_seq(ours, ref, rtol):
  for i, (a, b) in enumerate(zip(ours, ref)):
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert err < rtol, f"step {i}: relative error {err}"


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5)])
def test_matches_dense_reference_no_graft(shape):
  grads = _grads(shape, 4, seed=1)
  tx = sh.scale_by_shampoo(beta1=0.0, beta2=0.9, matrix_epsilon=1e-4,
                           graft_type="none", start_preconditioning_step=0,
                           precondition_every=1, block_size=64,
                           merge_small_dims_block_size=1)
  ours, _ = _run_gradax(tx, grads, shape)
  ref_opt = DenseShampoo(shape, beta2=0.9, eps=1e-4)
  ref = [ref_opt.step(g) for g in grads]
  _assert_close_seq(ours, ref, 2e-3)


def test_matches_dense_reference_sum_statistics_newton():
  shape = (5, 7)
  grads = _grads(shape, 3, seed=2)
  tx = sh.scale_by_shampoo(beta1=0.0, beta2=1.0, matrix_epsilon=1e-4,
                           graft_type="none", start_preconditioning_step=0,
                           precondition_every=1, root_method="newton")
  ours, _ = _run_gradax(tx, grads, shape)
  ref_opt = DenseShampoo(shape, beta2=1.0, eps=1e-4)
  ref = [ref_opt.step(g) for g in grads]
  _assert_close_seq(ours, ref, 2e-3)


def test_nesterov_momentum_is_nadam_form():
  # Before Shampoo starts, graft "sgd" passes g through; the Nesterov output
  # is NAdam's (Dozat 2016; optax scale_by_adam(nesterov=True)):
  # m_t = b m + (1-b) g, o = b m_t / (1 - b^(t+1)) + (1-b) g / (1 - b^t).
  grads = _grads((3, 4), 4, seed=7)
  tx = sh.scale_by_shampoo(beta1=0.8, graft_type="sgd",
                           start_preconditioning_step=100)
  ours, _ = _run_gradax(tx, grads, (3, 4))
  m = np.zeros((3, 4))
  for t, g in enumerate(grads, start=1):
    m = 0.8 * m + 0.2 * g
    ref = 0.8 * m / (1 - 0.8 ** (t + 1)) + 0.2 * g / (1 - 0.8 ** t)
    np.testing.assert_allclose(ours[t - 1], ref, rtol=1e-5, atol=1e-6)


def test_blocked_matches_per_block_reference_with_graft_and_momentum():
  # 10 x 12 with block 4: rows padded to 12, 3 x 3 blocks, last row block
  # holds 2 real rows. Each block is an independent dense Shampoo; the graft
  # norm is layer-wise, so the reference combines blocks before grafting.
  shape, bs = (10, 12), 4
  grads = _grads(shape, 5, seed=3)
  kw = dict(beta2=0.9, eps=1e-3, every=2, start=2)
  tx = sh.scale_by_shampoo(beta1=0.8, beta2=0.9, matrix_epsilon=1e-3,
                           graft_type="adam", graft_beta2=0.99,
                           start_preconditioning_step=2, precondition_every=2,
                           block_size=bs, nesterov=False)
  ours, state = _run_gradax(tx, grads, shape)
  blocks = {}
  for r in range(0, 10, bs):
    for c in range(0, 12, bs):
      rs, cs = slice(r, min(r + bs, 10)), slice(c, 12 if c + bs > 12 else c + bs)
      blocks[(rs.start, rs.stop, cs.start, cs.stop)] = DenseShampoo(
          (rs.stop - rs.start, cs.stop - cs.start), **kw)
  nu = np.zeros(shape)
  mu = np.zeros(shape)
  for t, g in enumerate(grads):
    g = g.astype(np.float64)
    d = np.zeros(shape)
    for (r0, r1, c0, c1), opt in blocks.items():
      d[r0:r1, c0:c1] = opt.step(g[r0:r1, c0:c1])
    nu = 0.99 * nu + 0.01 * g * g
    diag = g / (np.sqrt(nu / (1 - 0.99 ** (t + 1))) + 1e-8)
    u = d * np.linalg.norm(diag) / np.linalg.norm(d) if t >= 2 else diag
    mu = 0.8 * mu + 0.2 * u
    ref = mu / (1 - 0.8 ** (t + 1))
    err = np.linalg.norm(ours[t] - ref) / np.linalg.norm(ref)
    assert err < 2e-3, (t, err)
  assert int(state.root_failures) == 0
  assert int(state.count) == 5


def test_block_layout_roundtrip_and_merge():
  assert sh.merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 4096) == (
      1024, 2048, 12)
  plan = sh.make_block_plan(((10, 12), (3, 3, 8, 16), (7,)), 4, 4, 4096)
  lp = plan.leaves[0]
  assert lp.block == (4, 4) and lp.grid == (3, 3)
  assert plan.leaves[2].diagonal
  x = jnp.arange(120.0).reshape(10, 12)
  b = sh.to_blocks(x, lp)
  np.testing.assert_array_equal(b[1], x[0:4, 4:8])
  np.testing.assert_array_equal(sh.from_blocks(b, lp), x)
  a = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5)))
  a = a + jnp.swapaxes(a, 1, 2)
  np.testing.assert_array_equal(sh.unpack_sym(sh.pack_sym(a), 5), a)


def test_skip_large_dims_and_1d_are_diagonal():
  plan = sh.make_block_plan(((50, 3000), (100,), (5000, 6000)), 128, 128, 4096)
  assert not plan.leaves[0].diagonal
  assert plan.leaves[0].precond == (True, True)
  assert plan.leaves[1].diagonal
  assert plan.leaves[2].diagonal
  plan = sh.make_block_plan(((50, 6000),), 128, 128, 4096)
  assert plan.leaves[0].precond == (True, False)
  assert plan.leaves[0].block == (50, 6000)


# ---------------------------------------------------------------------------
# Robustness.
# ---------------------------------------------------------------------------


def test_nonfinite_gradient_is_skipped_and_counted():
  tx = sh.scale_by_shampoo(start_preconditioning_step=1, precondition_every=1)
  params = {"w": jnp.ones((6, 4)), "b": jnp.ones((4,))}
  state = tx.init(params)
  upd = jax.jit(tx.update)
  g = {"w": jnp.full((6, 4), 0.5), "b": jnp.ones((4,))}
  _, state = upd(g, state, params)
  bad = {"w": g["w"].at[0, 0].set(jnp.nan), "b": g["b"]}
  u, state2 = upd(bad, state, params)
  assert int(state2.skipped) == 1 and int(state2.count) == int(state.count)
  # Every other state array (stats, roots, moments, graft sums) is untouched.
  for a, b in zip(jax.tree.leaves(state2._replace(skipped=state.skipped)),
                  jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  u, state3 = upd(g, state2, params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((u, state3)))


def test_failed_roots_keep_previous_and_update_stays_finite():
  # failure_threshold below any attainable error forces every root to fail:
  # the roots stay at their initial identity, so the Shampoo direction is the
  # gradient itself (grafted to SGD's norm, i.e. exactly the gradient).
  tx = sh.scale_by_shampoo(beta1=0.0, graft_type="sgd", root_method="newton",
                           failure_threshold=1e-30,
                           start_preconditioning_step=0, precondition_every=1)
  g = jnp.asarray(_grads((5, 3), 1, seed=4)[0])
  state = tx.init(g)
  u, state = jax.jit(tx.update)(g, state, g)
  np.testing.assert_allclose(u, g, rtol=1e-5, atol=1e-6)
  assert int(state.root_failures) == 2
  eye = [sh.pack_sym(jnp.eye(n)) for n in (3, 5)]
  for r, e in zip(state.roots, eye):
    np.testing.assert_array_equal(r[0], e)


def test_zero_gradient_layer_gives_finite_zero_update():
  tx = sh.scale_by_shampoo(start_preconditioning_step=0, precondition_every=1)
  params = {"a": jnp.ones((4, 4)), "z": jnp.ones((3, 5))}
  state = tx.init(params)
  g = {"a": jnp.eye(4), "z": jnp.zeros((3, 5))}
  u, state = jax.jit(tx.update)(g, state, params)
  assert np.all(np.asarray(u["z"]) == 0)
  assert np.all(np.isfinite(np.asarray(u["a"])))


def test_bf16_storage_and_bf16_params_keep_dtype():
  tx = sh.shampoo(1e-2, statistics_dtype=jnp.bfloat16, mu_dtype=jnp.bfloat16,
                  start_preconditioning_step=1, precondition_every=2)
  params = {"w": jnp.ones((8, 6), jnp.bfloat16), "b": jnp.ones((6,), jnp.float32)}
  state = tx.init(params)
  g = {"w": jnp.asarray(_grads((8, 6), 1, 5)[0], jnp.bfloat16),
       "b": jnp.ones((6,), jnp.float32)}
  upd = jax.jit(tx.update)
  for _ in range(3):
    u, state = upd(g, state, params)
  assert u["w"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.float32
  st = state[0]
  assert all(x.dtype == jnp.bfloat16 for x in st.stats + st.roots)
  # The default graft's factored second moment is stored in mu_dtype.
  assert st.nu_row["w"].shape == (8,) and st.nu_col["w"].shape == (6,)
  assert all(x.dtype == jnp.bfloat16
             for x in jax.tree.leaves((st.nu_row, st.nu_col, st.mu)))
  assert all(np.all(np.isfinite(np.asarray(x, np.float32)))
             for x in jax.tree.leaves(u))


@pytest.mark.parametrize("kwargs, name", [
    (dict(beta1=1.0), "beta1"),
    (dict(beta2=0.0), "beta2"),
    (dict(block_size=0), "block_size"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(statistics_every=-1), "statistics_every"),
    (dict(graft_type="lion"), "graft_type"),
    (dict(root_method="qr"), "root_method"),
    (dict(matrix_epsilon=-1.0), "matrix_epsilon"),
    (dict(exponent_override=0), "exponent_override"),
    (dict(start_preconditioning_step=-2), "start_preconditioning_step"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    sh.shampoo(1e-3, **kwargs)


# ---------------------------------------------------------------------------
# Convergence.
# ---------------------------------------------------------------------------


def _best_steps(factory, lrs, loss, params, target, max_steps):
  """Fewest steps to reach `target` over learning rates, with one compile.

  The learning rate is an injected hyperparameter, so every rate reuses the
  same jitted scan.
  """
  tx = optax.inject_hyperparams(factory)(learning_rate=lrs[0])

  @jax.jit
  def run(params, state):
    def body(carry, _):
      p, s = carry
      l, g = jax.value_and_grad(loss)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), l
    _, losses = jax.lax.scan(body, (params, state), None, length=max_steps)
    return losses

  best = max_steps
  for lr in lrs:
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    losses = np.asarray(run(params, state))
    hit = np.nonzero(losses <= target)[0]
    best = min(best, int(hit[0]) if hit.size else max_steps)
  return best


def test_ill_conditioned_quadratic_beats_adam():
  # f(W) = 0.5 tr((W - W*)ᵀ A (W - W*) B) with condition numbers 1e3 each.
  rng = np.random.default_rng(0)
  def spd(n, cond):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return jnp.asarray((q * np.logspace(0, -np.log10(cond), n)) @ q.T,
                       jnp.float32)
  a, b = spd(12, 1e3), spd(8, 1e3)
  w_star = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)
  def loss(w):
    d = w - w_star
    return 0.5 * jnp.sum(d * (a @ d @ b))
  w0 = jnp.zeros((12, 8))
  target = 1e-2 * float(loss(w0))
  lrs = (0.03, 0.1, 0.3)
  best_adam = _best_steps(optax.adam, lrs, loss, w0, target, 600)
  shampoo = lambda learning_rate: sh.shampoo(
      learning_rate, beta2=0.99, graft_type="adam",
      start_preconditioning_step=2, precondition_every=5)
  best_sh = _best_steps(shampoo, lrs, loss, w0, target, 600)
  assert best_sh < best_adam, (best_sh, best_adam)


@pytest.mark.parametrize("problem", ["parabola", "rosenbrock", "matrix"])
def test_converges_to_known_minimum(problem):
  if problem == "parabola":
    x0, opt = jnp.array([1.0, 2.0, -1.5]), jnp.array([-1.0, 0.5, 2.0])
    loss = lambda x: jnp.sum((x - opt) ** 2)
    lr, steps = 0.05, 1500
  elif problem == "rosenbrock":
    x0, opt = jnp.array([-1.0, 1.5]), jnp.array([1.0, 1.0])
    loss = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    lr, steps = 0.02, 10000
  else:
    x0, opt = jnp.array([[1.0, -2.0], [0.5, 3.0]]), jnp.array(
        [[0.0, 1.0], [-1.0, 2.0]])
    loss = lambda x: jnp.sum((x - opt) ** 2)
    lr, steps = 0.05, 1500
  tx = sh.shampoo(lr, start_preconditioning_step=2, precondition_every=5)
  state = tx.init(x0)

  @jax.jit
  def run(x, s):
    def body(c, _):
      x, s = c
      u, s = tx.update(jax.grad(loss)(x), s, x)
      return (optax.apply_updates(x, u), s), None
    return jax.lax.scan(body, (x, s), None, length=steps)[0]

  x, _ = run(x0, state)
  np.testing.assert_allclose(x, opt, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------
# optax compatibility.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree():
  rng = np.random.default_rng(7)
  params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
            "b": jnp.zeros((4,), jnp.float32)}
  grads = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  return params, grads


def test_jit_no_recompile_on_second_step(tree):
  params, grads = tree
  tx = sh.shampoo(1e-2, start_preconditioning_step=1, precondition_every=2)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  s = tx.init(params)
  for _ in range(4):  # crosses both cond branches (roots due / not due)
    params, s = step(params, s)
  assert len(traces) == 1


def test_inject_hyperparams_matches_plain(tree):
  params, grads = tree
  # A larger ridge keeps the roots well conditioned (the 6x4 statistics are
  # rank deficient), so rounding differences stay small.
  plain = sh.shampoo(0.01, beta1=0.9, weight_decay=0.1, matrix_epsilon=1e-3,
                     start_preconditioning_step=1, precondition_every=2)
  inj = optax.inject_hyperparams(sh.shampoo)(
      learning_rate=0.01, beta1=0.9, weight_decay=0.1, matrix_epsilon=1e-3,
      start_preconditioning_step=1, precondition_every=2)
  s1, s2 = plain.init(params), inj.init(params)
  for _ in range(3):
    u1, s1 = plain.update(grads, s1, params)
    u2, s2 = inj.update(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_multisteps_first_update_is_zero_and_accumulates(tree):
  params, grads = tree
  ms = optax.MultiSteps(sh.shampoo(1e-2), every_k_schedule=2)
  s = ms.init(params)
  upd = jax.jit(ms.update)
  u, s = upd(grads, s, params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  u, s = upd(grads, s, params)
  ref = sh.shampoo(1e-2)
  ur, _ = jax.jit(ref.update)(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ur)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chain_and_masked(tree):
  params, grads = tree
  mask = {"w": True, "b": False}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.masked(sh.scale_by_shampoo(), mask),
                   optax.scale(-1e-2))
  s = tx.init(params)
  u, s = jax.jit(tx.update)(grads, s, params)
  # The unmasked leaf passes through the clip and scale only.
  norm = float(optax.tree.norm(grads))
  np.testing.assert_allclose(u["b"], -1e-2 * grads["b"] * min(1.0, 1 / norm),
                             rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(u["w"])))


def test_learning_rate_schedule_equals_constant(tree):
  params, grads = tree
  a = sh.shampoo(0.02)
  b = sh.shampoo(optax.constant_schedule(0.02))
  ua, _ = jax.jit(a.update)(grads, a.init(params), params)
  ub, _ = jax.jit(b.update)(grads, b.init(params), params)
  for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
    np.testing.assert_array_equal(x, y)


def test_state_sharding_stable_on_explicit_mesh():
  mesh = distributed.make_mesh("data=8")
  with jax.set_mesh(mesh):
    params = {"w": jax.device_put(jnp.ones((16, 24)),
                                  NamedSharding(mesh, P("data", None))),
              "b": jax.device_put(jnp.ones((24,)), NamedSharding(mesh, P()))}
    grads = jax.tree.map(lambda x: x * 0.3 + 0.1, params)
    tx = sh.shampoo(1e-2, block_size=8, start_preconditioning_step=1,
                    precondition_every=1)
    state = jax.jit(tx.init)(params)
    step = jax.jit(tx.update)
    u, state2 = step(grads, state, params)
    u, state3 = step(grads, state2, params)
    types = lambda t: [jax.typeof(x) for x in jax.tree.leaves(t)]
    assert types(state2) == types(state) == types(state3)
    assert jax.typeof(u["w"]) == jax.typeof(params["w"])
  # Same numbers as an unsharded run.
  ref_tx = sh.shampoo(1e-2, block_size=8, start_preconditioning_step=1,
                      precondition_every=1)
  rp = jax.tree.map(np.asarray, params)
  rg = jax.tree.map(np.asarray, grads)
  rs = ref_tx.init(rp)
  ur, rs = ref_tx.update(rg, rs, rp)
  ur, rs = ref_tx.update(rg, rs, rp)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(ur)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                               atol=1e-6)


def test_distributed_roots_match_single_device():
  mesh = distributed.make_mesh("data=8")
  rng = np.random.default_rng(11)
  params = {"w": jnp.zeros((20, 12)), "c": jnp.zeros((4, 6, 5)),
            "b": jnp.zeros((12,))}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                              jnp.float32), params)
           for _ in range(3)]
  kw = dict(block_size=8, start_preconditioning_step=1, precondition_every=1)
  single = sh.shampoo(1e-2, **kw)
  dist = sh.shampoo(1e-2, axis_name="data", **kw)

  rep = lambda t: jax.tree.map(lambda _: P(), t)
  s_single = single.init(params)
  s_dist = dist.init(params)

  @jax.jit
  def dist_step(g, s, p):
    f = jax.shard_map(dist.update, mesh=mesh, in_specs=(rep(g), rep(s), rep(p)),
                      out_specs=(rep(g), rep(s)))
    return f(g, s, p)

  for g in grads:
    u1, s_single = jax.jit(single.update)(g, s_single, params)
    u2, s_dist = dist_step(g, s_dist, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(s_single[0].roots, s_dist[0].roots):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
