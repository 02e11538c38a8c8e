"""Tests for gradax.optimizers.matrix_roots (inverse p-th roots)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradax as gx
from gradax.optimizers import matrix_roots as mr


def _spd(n, cond, seed):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  w = np.logspace(0, -np.log10(cond), n)
  return (q * w) @ q.T, q, w


@pytest.fixture(scope="module")
def batch():
  mats = [_spd(16, c, s) for s, c in enumerate((10.0, 1e3, 1e5))]
  return mats


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [4, 6])
def test_closed_form_on_known_spd(batch, method, p):
  a = jnp.asarray(np.stack([m[0] for m in batch]), jnp.float32)
  eps = 1e-6
  res = mr.inverse_pth_root(a, p, method=method, ridge_epsilon=eps)
  assert np.all(np.asarray(res.ok))
  for i, (_, q, w) in enumerate(batch):
    ref = (q * (w + eps * w.max()) ** (-1.0 / p)) @ q.T
    err = np.linalg.norm(np.asarray(res.root[i]) - ref) / np.linalg.norm(ref)
    assert err < 5e-3, (i, err)


def test_diagonal_closed_form_and_methods_agree():
  a = jnp.diag(jnp.array([16.0, 1.0, 81.0]))
  for method in ("eigh", "newton"):
    r = mr.inverse_pth_root(a, 4, method=method, ridge_epsilon=0.0)
    np.testing.assert_allclose(np.diag(r.root), [0.5, 1.0, 1.0 / 3.0],
                               rtol=1e-4)
  a, _, _ = _spd(12, 1e2, 7)
  a = jnp.asarray(a, jnp.float32)
  e = mr.inverse_pth_root(a, 4, method="eigh").root
  n = mr.inverse_pth_root(a, 4, method="newton").root
  np.testing.assert_allclose(e, n, rtol=1e-3, atol=1e-4)
  # X^p (A + rI) = I.
  x = np.asarray(n, np.float64)
  lam = np.linalg.eigvalsh(np.asarray(a, np.float64)).max()
  resid = np.linalg.matrix_power(x, 4) @ (np.asarray(a) + 1e-6 * lam * np.eye(12))
  np.testing.assert_allclose(resid, np.eye(12), atol=1e-3)


def test_absolute_ridge():
  a = jnp.zeros((3, 3)).at[0, 0].set(1.0)
  r = mr.inverse_pth_root(a, 2, method="eigh", ridge_epsilon=0.25,
                          relative_ridge=False)
  np.testing.assert_allclose(np.diag(r.root), [1 / np.sqrt(1.25), 2.0, 2.0],
                             rtol=1e-5)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_failures_keep_previous(method):
  good, _, _ = _spd(4, 10.0, 1)
  mats = jnp.asarray(np.stack([good, np.zeros((4, 4)),
                               np.full((4, 4), np.nan)]), jnp.float32)
  prev = jnp.stack([2.0 * jnp.eye(4)] * 3)
  root, failed = mr.safe_inverse_pth_root(mats, prev, 4, method=method)
  assert list(np.asarray(failed)) == [False, True, True]
  np.testing.assert_array_equal(root[1:], prev[1:])
  assert np.all(np.isfinite(np.asarray(root)))


def test_newton_zero_matrix_does_not_hold_the_batch():
  """An all-zero matrix (a block that has seen no gradient yet) never
  converges; it must not keep the batch's loop running to the cap."""
  a, _, _ = _spd(6, 1e3, 5)
  a = jnp.asarray(a, jnp.float32)
  alone = mr.inverse_pth_root(a[None], 4, method="newton")
  batch = mr.inverse_pth_root(jnp.stack([jnp.zeros_like(a), a]), 4,
                              method="newton", num_newton_iters=100)
  assert 0 < int(alone.iterations) < 40
  assert int(batch.iterations) == int(alone.iterations)
  # Equal up to rounding: GPU kernels pick different code paths per batch size.
  np.testing.assert_allclose(batch.root[1], alone.root[0], rtol=1e-4, atol=1e-6)
  assert list(np.asarray(batch.ok)) == [False, True]


def test_newton_error_threshold_rejects():
  a, _, _ = _spd(8, 1e4, 3)
  res = mr.inverse_pth_root(jnp.asarray(a, jnp.float32), 4, method="newton",
                            num_newton_iters=2, failure_threshold=1e-3)
  assert not bool(res.ok) and float(res.error) > 1e-3


def test_power_iteration():
  a, _, w = _spd(10, 5.0, 4)
  lam = mr.power_iteration_max_eig(jnp.asarray(a * 3.0, jnp.float32), 50)
  np.testing.assert_allclose(lam, 3.0 * w.max(), rtol=1e-3)


@pytest.mark.parametrize("kwargs, name", [
    (dict(p=0), "p"), (dict(p=2.5), "p"), (dict(method="qr"), "method"),
    (dict(ridge_epsilon=-1.0), "ridge_epsilon")])
def test_bad_arguments(kwargs, name):
  kw = dict(p=4)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=name):
    mr.inverse_pth_root(jnp.eye(2), **kw)


def test_bf16_previous_dtype_kept():
  a, _, _ = _spd(4, 10.0, 2)
  prev = jnp.eye(4, dtype=jnp.bfloat16)
  root, _ = jax.jit(lambda x, y: mr.safe_inverse_pth_root(x, y, 4))(
      jnp.asarray(a, jnp.float32), prev)
  assert root.dtype == jnp.bfloat16


def test_one_matrix_per_call_on_cpu_matches_batched_and_is_unbatched():
  """Same values as the batched op, and on CPU each LAPACK call sees one
  matrix (batched CPU LAPACK calls can deadlock across fake devices)."""
  x = jax.random.normal(jax.random.key(3), (2, 3, 5, 5))
  a = x @ jnp.swapaxes(x, -1, -2)
  per_call = jax.jit(lambda a: mr.one_matrix_per_call_on_cpu(
      jnp.linalg.eigh, a))
  w, q = per_call(a)
  w_ref, _ = jnp.linalg.eigh(a)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-5)
  # q diag(w) qᵀ rebuilds each matrix (eigenvectors are unique up to sign)
  np.testing.assert_allclose(
      jnp.einsum("...ij,...j,...kj->...ik", q, w, q), a, rtol=1e-4, atol=1e-4)
  r_q, r_r = mr.one_matrix_per_call_on_cpu(jnp.linalg.qr, x)
  np.testing.assert_allclose(r_q @ r_r, x, rtol=1e-5, atol=1e-5)
  # Lowered for CPU explicitly, so the check also holds on a GPU host.
  cpu_text = per_call.trace(a).lower(lowering_platforms=("cpu",)).as_text()
  calls = [l for l in cpu_text.splitlines() if "lapack_ssyevd" in l]
  assert calls and all('num_batch_dims = "0"' in l for l in calls), calls


@pytest.mark.parametrize("build", [
    lambda: gx.optimizers.shampoo(1e-3, root_method="newton"),
    lambda: gx.optimizers.shampoo(1e-3, root_method="eigh"),
    lambda: gx.optimizers.soap(1e-3),
], ids=["shampoo-newton", "shampoo-eigh", "soap"])
def test_every_matmul_asks_for_full_float32(build):
  # JAX's default precision lets GPUs run float32 matmuls in TF32 (10-bit
  # mantissa): Newton then stalls near 1e-3 and the preconditioner drifts.
  # CPU computes float32 either way, so check the lowered program instead.
  params = {"w": jnp.ones((16, 24)), "b": jnp.ones((24,)),
            "t": jnp.ones((4, 6, 8))}
  tx = build()
  text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert dots, "expected matmuls in the lowered update"
  loose = [line.strip()[:120] for line in dots if "HIGHEST" not in line]
  assert not loose, loose
