"""Tests for gradax.optimizers.soap (Adam in Shampoo's eigenbasis)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# The package re-exports the function `soap`, which shadows the module.
sp = importlib.import_module("gradax.optimizers.soap")


def _mode(g, m, j):
  return np.moveaxis(np.tensordot(m, np.moveaxis(g, j, 0), axes=(1, 0)), 0, j)


def _unfold(g, j):
  return np.moveaxis(g, j, 0).reshape(g.shape[j], -1)


class DenseSoap:
  """SOAP on one tensor in float64 NumPy, written from the paper's rules."""

  def __init__(self, shape, b1, b2, eps, every):
    self.k = len(shape)
    self.b1, self.b2, self.eps, self.every = b1, b2, eps, every
    self.stats = [np.zeros((d, d)) for d in shape]
    self.q = [np.eye(d) for d in shape]
    self.m = np.zeros(shape)
    self.v = np.zeros(shape)
    self.t = 0

  def proj(self, x, back=False):
    for j in range(self.k):
      x = _mode(x, self.q[j] if back else self.q[j].T, j)
    return x

  def step(self, g):
    g = np.asarray(g, np.float64)
    t = self.t
    self.t += 1
    if t == 0:
      self.stats = [_unfold(g, j) @ _unfold(g, j).T for j in range(self.k)]
      self.q = [np.linalg.eigh(s)[1][:, ::-1] for s in self.stats]
      return np.zeros_like(g)
    gp = self.proj(g)
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * gp ** 2
    u = self.proj(self.proj(self.m) / (np.sqrt(self.v) + self.eps), back=True)
    u *= np.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)
    for j in range(self.k):
      self.stats[j] = self.b2 * self.stats[j] + (1 - self.b2) * (
          _unfold(g, j) @ _unfold(g, j).T)
    if t % self.every == 0:
      for j in range(self.k):
        est = np.diag(self.q[j].T @ self.stats[j] @ self.q[j])
        order = np.argsort(-est)
        self.v = np.take(self.v, order, axis=j)
        self.q[j] = np.linalg.qr(self.stats[j] @ self.q[j][:, order])[0]
    return u


def _grads(shape, n, seed):
  rng = np.random.default_rng(seed)
  mix = [rng.normal(size=(d, d)) for d in shape]
  out = []
  for _ in range(n):
    g = rng.normal(size=shape)
    for j, m in enumerate(mix):
      g = _mode(g, m, j)
    out.append(g.astype(np.float32))
  return out


@pytest.mark.parametrize("shape", [(6, 6), (4, 4, 4)])
def test_matches_dense_reference(shape):
  grads = _grads(shape, 6, seed=0)
  tx = sp.scale_by_soap(b1=0.9, b2=0.95, eps=1e-8, precondition_every=2,
                        merge_small_dims_block_size=1)
  params = jnp.zeros(shape)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  ref = DenseSoap(shape, 0.9, 0.95, 1e-8, 2)
  for t, g in enumerate(grads):
    u, state = upd(jnp.asarray(g), state, params)
    r = ref.step(g)
    if t == 0:
      assert np.all(np.asarray(u) == 0)
      continue
    err = np.linalg.norm(np.asarray(u) - r) / np.linalg.norm(r)
    assert err < 2e-3, (t, err)


def test_blocked_matrix_equals_independent_blocks_and_1d_is_adam():
  shape, bs = (8, 8), 4
  grads = _grads(shape, 4, seed=1)
  bias = [np.asarray(g[0]) for g in grads]
  tx = sp.scale_by_soap(b1=0.9, b2=0.95, precondition_every=2, block_size=bs)
  params = {"w": jnp.zeros(shape), "b": jnp.zeros((8,))}
  state = tx.init(params)
  upd = jax.jit(tx.update)
  refs = {(r, c): DenseSoap((bs, bs), 0.9, 0.95, 1e-8, 2)
          for r in (0, 4) for c in (0, 4)}
  adam = optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)
  adam_state = adam.init(jnp.zeros((8,)))
  for t, (g, b) in enumerate(zip(grads, bias)):
    u, state = upd({"w": jnp.asarray(g), "b": jnp.asarray(b)}, state, params)
    ref = np.zeros(shape)
    for (r, c), opt in refs.items():
      ref[r:r + bs, c:c + bs] = opt.step(g[r:r + bs, c:c + bs])
    if t == 0:
      assert np.all(np.asarray(u["w"]) == 0) and np.all(np.asarray(u["b"]) == 0)
      continue
    np.testing.assert_allclose(u["w"], ref, rtol=2e-3, atol=1e-5)
    ua, adam_state = adam.update(jnp.asarray(b), adam_state)
    np.testing.assert_allclose(u["b"], ua, rtol=1e-4, atol=1e-6)


def test_nonfinite_gradient_skipped():
  tx = sp.soap(1e-2)
  params = jnp.ones((5, 4))
  state = tx.init(params)
  upd = jax.jit(tx.update)
  g = jnp.asarray(_grads((5, 4), 1, 2)[0])
  _, state = upd(g, state, params)
  _, state = upd(g, state, params)
  u, state2 = upd(g.at[1, 1].set(jnp.inf), state, params)
  assert np.all(np.asarray(u) == 0)
  assert int(state2[0].skipped) == 1
  # Every other state array (count, stats, bases, moments) is untouched.
  for a, b in zip(jax.tree.leaves(state2[0]._replace(skipped=0)),
                  jax.tree.leaves(state[0]._replace(skipped=0))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(2, 3), (4, 8), (2, 3, 4)])
def test_constant_rank_one_gradient_closed_form(shape):
  # G = c * ones: the first step's eigenbases have the unit all-ones vectors
  # as top columns, so Q(G) has one non-zero entry c*sqrt(N) (N = G.size).
  # With a constant gradient bias-corrected Adam gives exactly 1 there (eps
  # aside) and 0 elsewhere, so every later update is ones / sqrt(N). The
  # other eigen-directions see only rounding noise (~1e-8 of |G|), which
  # must not be scaled up to full-size steps.
  g = jnp.full(shape, 3.0)
  tx = sp.scale_by_soap(b1=0.9, b2=0.95, merge_small_dims_block_size=1)
  upd = jax.jit(tx.update)
  state = tx.init(g)
  u, state = upd(g, state, g)
  assert np.all(np.asarray(u) == 0)
  for _ in range(3):
    u, state = upd(g, state, g)
    np.testing.assert_allclose(u, np.ones(shape) / np.sqrt(g.size),
                               rtol=1e-4)


@pytest.mark.parametrize("problem", ["parabola", "matrix"])
def test_converges(problem):
  if problem == "parabola":
    x0, opt = jnp.array([1.0, 2.0, -1.5]), jnp.array([-1.0, 0.5, 2.0])
  else:
    x0, opt = jnp.array([[1.0, -2.0], [0.5, 3.0]]), jnp.array(
        [[0.0, 1.0], [-1.0, 2.0]])
  loss = lambda x: jnp.sum((x - opt) ** 2)
  tx = sp.soap(0.02, b1=0.9, b2=0.99)

  @jax.jit
  def run(x):
    def body(c, _):
      x, s = c
      u, s = tx.update(jax.grad(loss)(x), s, x)
      return (optax.apply_updates(x, u), s), None
    return jax.lax.scan(body, (x, tx.init(x)), None, length=1500)[0][0]

  np.testing.assert_allclose(run(x0), opt, atol=3e-2)


def test_optax_wrappers_and_dtype():
  # Square, full-rank blocks: in a rank-deficient factor's null space Adam
  # amplifies rounding noise, which would make the comparison meaningless.
  params = {"w": jnp.ones((4, 4), jnp.bfloat16), "b": jnp.ones((4,))}
  grads = {"w": jnp.asarray(_grads((4, 4), 1, 3)[0], jnp.bfloat16),
           "b": jnp.ones((4,))}
  tx = optax.chain(optax.masked(sp.scale_by_soap(), {"w": True, "b": False}),
                   optax.scale(-0.1))
  traces = []

  @jax.jit
  def step(s):
    traces.append(1)
    return tx.update(grads, s, params)

  s = tx.init(params)
  for _ in range(3):
    u, s = step(s)
  assert len(traces) == 1
  assert u["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(u["b"], -0.1 * grads["b"])
  inj = optax.inject_hyperparams(sp.soap)(learning_rate=0.01)
  plain = sp.soap(0.01)
  si, sp_ = inj.init(params), plain.init(params)
  # Fresh gradients each step: a repeated gradient is exactly diagonal in its
  # own eigenbasis, and Adam would amplify the rounding noise off the diagonal.
  for g in _grads((4, 4), 3, 5):
    gr = {"w": jnp.asarray(g, jnp.bfloat16), "b": grads["b"]}
    ui, si = jax.jit(inj.update)(gr, si, params)
    up, sp_ = jax.jit(plain.update)(gr, sp_, params)
  for a, b in zip(jax.tree.leaves(ui), jax.tree.leaves(up)):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(block_size=0), "block_size"), (dict(weight_decay=-1.0),
                                         "weight_decay")])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    sp.soap(1e-3, **kwargs)
