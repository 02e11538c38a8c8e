"""Inverse p-th roots of symmetric PSD matrices, batched and failure-safe.

Shampoo (Gupta, Koren, Singer 2018, arXiv 1802.09568) needs ``A^{-1/p}`` for
every Kronecker factor ``A``. This module offers two methods that both work on
a stack of matrices ``(..., n, n)`` in one call (so all blocks of the same
size go through one batched op):

* ``"eigh"``: ``A = Q diag(w) Qᵀ`` and ``A^{-1/p} = Q diag((w + r)^{-1/p}) Qᵀ``.
* ``"newton"``: the coupled Newton iteration of Higham, *Functions of
  Matrices* (2008), eq. 7.18, which uses only matmuls.

Both add a ridge ``r = ε·λ_max(A)`` (or ``r = ε`` when not relative), always
compute in float32, and report an error. ``safe_inverse_pth_root`` keeps the
previous root when the new one is non-finite or its error is too large, so a
failed root never reaches the optimizer's state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("eigh", "newton")

# Roots need true float32 products: JAX's default lets GPUs use TF32 (10-bit
# mantissa) for float32 matmuls, which stalls Newton near 1e-3 and skews the
# eigh root.
_HIGHEST = lax.Precision.HIGHEST


def _matmul(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


class RootResult(NamedTuple):
  """A batch of inverse roots with their diagnostics.

  Attributes:
    root: ``(..., n, n)`` float32 approximations of ``(A + r I)^{-1/p}``.
    error: ``(...)`` float32 error measure (see ``inverse_pth_root``).
    ok: ``(...)`` bool, True where the root is finite, ``λ_max > 0`` and the
      error is at most the failure threshold.
    iterations: ``()`` int32, coupled-Newton iterations the batch ran (the
      loop runs until every matrix is done; 0 for ``eigh``).
  """
  root: jax.Array
  error: jax.Array
  ok: jax.Array
  iterations: jax.Array


def one_matrix_per_call_on_cpu(fn, *xs):
  """``fn(*xs)`` for a LAPACK-backed ``jnp.linalg`` op over a stack of matrices.

  On CPU the stack goes through ``lax.map``, one matrix per kernel call; on
  other backends ``fn`` gets the whole stack. Why: jaxlib's CPU LAPACK kernels
  (``syevd``, ``geqrf``, ...) split a batch into tasks on the same intra-op
  thread pool that runs the devices' programs and then block on them. With
  several (fake) CPU devices running the same batched op at once, every pool
  thread can end up waiting for tasks that no thread is free to run: a
  deadlock (seen with SOAP on 8 CPU devices). A single matrix per call runs
  inline.

  Args:
    fn: e.g. ``jnp.linalg.eigh``; maps ``(..., m, n)`` arrays to a pytree of
      arrays with the same leading batch dimensions.
    *xs: arrays ``(..., m, n)`` sharing their leading batch dimensions.

  Returns:
    ``fn(*xs)``.

  Example:
    >>> w, q = one_matrix_per_call_on_cpu(jnp.linalg.eigh, jnp.eye(3)[None])
  """
  batch = xs[0].shape[:-2]
  if not batch:
    return fn(*xs)

  def per_matrix(*xs):
    flat = [x.reshape((-1,) + x.shape[-2:]) for x in xs]
    out = lax.map(lambda args: fn(*args), flat)
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)

  return lax.platform_dependent(*xs, cpu=per_matrix, default=fn)


def _check_common(p, ridge_epsilon, method):
  if not isinstance(p, int) or isinstance(p, bool) or p < 1:
    raise ValueError(
        f"p={p!r} is not allowed; the root order must be an integer >= 1.")
  if isinstance(ridge_epsilon, (int, float)) and not ridge_epsilon >= 0.0:
    raise ValueError(
        f"ridge_epsilon={ridge_epsilon!r} is not allowed; it must be >= 0.")
  if method not in METHODS:
    raise ValueError(
        f"method={method!r} is not allowed; choose one of {METHODS}.")


def _sym(a):
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _eye_like(a):
  return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def _mat_power(m, p: int):
  """``m^p`` for a static positive integer ``p`` by repeated squaring."""
  result = None
  base = m
  while p:
    if p & 1:
      result = base if result is None else _matmul(result, base)
    p >>= 1
    if p:
      base = _matmul(base, base)
  return result


def power_iteration_max_eig(a: jax.Array, num_iters: int = 20) -> jax.Array:
  """Estimates ``λ_max`` of a batch of symmetric PSD matrices ``(..., n, n)``.

  Starts from the all-ones vector plus a small ramp (so it is not orthogonal
  to the top eigenvector of common structured matrices) and returns the
  Rayleigh quotient after ``num_iters`` matrix-vector products.
  """
  n = a.shape[-1]
  # Built from `a` so it has a's varying-ness inside shard_map.
  v = a[..., 0] * 0.0 + 1.0 + jnp.linspace(0.0, 0.5, n, dtype=a.dtype)

  def body(_, v):
    w = jnp.einsum("...ij,...j->...i", a, v, precision=_HIGHEST)
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-30)

  v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  v = lax.fori_loop(0, num_iters, body, v)
  return jnp.einsum("...i,...ij,...j->...", v, a, v, precision=_HIGHEST)


def _eigh_root(a, p, ridge_epsilon, relative_ridge):
  w, q = one_matrix_per_call_on_cpu(jnp.linalg.eigh, a)
  lam_max = jnp.max(w, axis=-1)
  ridge = ridge_epsilon * lam_max if relative_ridge else jnp.full_like(
      lam_max, ridge_epsilon)
  w_pos = jnp.maximum(w, 0.0)
  scale = (w_pos + ridge[..., None]) ** (-1.0 / p)
  root = jnp.einsum("...ij,...j,...kj->...ik", q, scale, q, precision=_HIGHEST)
  recon = jnp.einsum("...ij,...j,...kj->...ik", q, w, q, precision=_HIGHEST)
  error = jnp.linalg.norm(recon - a, axis=(-2, -1)) / jnp.maximum(
      jnp.linalg.norm(a, axis=(-2, -1)), 1e-30)
  return root, error, lam_max


def _newton_root(a, p, ridge_epsilon, relative_ridge, num_iters, tolerance):
  lam_max = power_iteration_max_eig(a)
  ridge = ridge_epsilon * lam_max if relative_ridge else jnp.full_like(
      lam_max, ridge_epsilon)
  eye = _eye_like(a)
  damped = a + ridge[..., None, None] * eye
  # z = (1+p) / (2 ||A||) puts the spectrum of M_0 inside (0, (p+1)/2].
  norm = jnp.maximum(lam_max + ridge, 1e-30)
  z = (1.0 + p) / (2.0 * norm)
  m = damped * z[..., None, None]
  x = eye * (z ** (1.0 / p))[..., None, None]
  err = jnp.max(jnp.abs(m - eye), axis=(-2, -1))
  # A matrix with no positive eigenvalue (e.g. all-zero statistics) never
  # converges and is flagged failed anyway; without this it kept the whole
  # batch iterating to ``num_iters`` (its error stays at 1, within the 1.2
  # growth allowance).
  done = (err <= tolerance) | jnp.logical_not(lam_max > 0.0)

  def cond(carry):
    i, _, _, _, done = carry
    return jnp.logical_and(i < num_iters, jnp.logical_not(jnp.all(done)))

  def body(carry):
    i, m, x, err, done = carry
    m_i = ((p + 1.0) * eye - m) / p
    x_new = _matmul(x, m_i)
    m_new = _matmul(_mat_power(m_i, p), m)
    err_new = jnp.max(jnp.abs(m_new - eye), axis=(-2, -1))
    # Accept while the error does not grow much; stop a matrix once it stalls.
    accept = jnp.logical_and(jnp.logical_not(done), err_new < 1.2 * err)
    accept = jnp.logical_and(accept, jnp.isfinite(err_new))
    sel = accept[..., None, None]
    m = jnp.where(sel, m_new, m)
    x = jnp.where(sel, x_new, x)
    err = jnp.where(accept, err_new, err)
    done = jnp.logical_or(done, jnp.logical_not(accept))
    done = jnp.logical_or(done, err <= tolerance)
    return i + 1, m, x, err, done

  iters, _, x, err, _ = lax.while_loop(cond, body, (0, m, x, err, done))
  return x, err, lam_max, iters


def inverse_pth_root(
    matrix: jax.Array,
    p: int,
    *,
    method: str = "eigh",
    ridge_epsilon: float = 1e-6,
    relative_ridge: bool = True,
    num_newton_iters: int = 100,
    newton_tolerance: float = 1e-6,
    failure_threshold: float = 0.1,
) -> RootResult:
  r"""Computes :math:`(A + rI)^{-1/p}` for a batch of symmetric PSD matrices.

  With :math:`r = \epsilon\,\lambda_{\max}(A)` (``relative_ridge``) or
  :math:`r = \epsilon`. The input is cast to float32 and symmetrised.

  * ``eigh``: :math:`A = Q\,\mathrm{diag}(w)\,Q^\top`, root
    :math:`Q\,\mathrm{diag}((\max(w,0) + r)^{-1/p})\,Q^\top`; the error is
    the relative backward error :math:`\|Q\,\mathrm{diag}(w)Q^\top - A\|_F /
    \|A\|_F` of the decomposition.
  * ``newton``: coupled Newton (Higham 2008, eq. 7.18) with
    :math:`z = (1+p)/(2\lambda_{\max})`, :math:`M_0 = z(A + rI)`,
    :math:`X_0 = z^{1/p} I`, and :math:`T_k = ((p+1)I - M_k)/p`,
    :math:`X_{k+1} = X_k T_k`, :math:`M_{k+1} = T_k^p M_k`; :math:`M_k \to I`
    and :math:`X_k \to (A + rI)^{-1/p}`. The error is
    :math:`\max|M_k - I|`. Each matrix stops when the error is below
    ``newton_tolerance`` or stops decreasing.

  A matrix with :math:`\lambda_{\max} \le 0` (e.g. all-zero statistics), a
  non-finite root, or an error above ``failure_threshold`` is flagged
  ``ok=False``.

  Args:
    matrix: ``(..., n, n)`` symmetric PSD matrices.
    p: positive integer root order.
    method: ``"eigh"`` or ``"newton"``.
    ridge_epsilon: ridge ε (relative to :math:`\lambda_{\max}` by default).
    relative_ridge: scale the ridge by :math:`\lambda_{\max}`.
    num_newton_iters: iteration cap for ``newton``.
    newton_tolerance: stopping tolerance on :math:`\max|M - I|`.
    failure_threshold: largest error accepted as a success.

  Returns:
    A ``RootResult(root, error, ok)``.

  Example:
    >>> a = jnp.diag(jnp.array([16.0, 1.0]))
    >>> r = inverse_pth_root(a, 4, ridge_epsilon=0.0)
    >>> jnp.diag(r.root)   # [0.5, 1.0]
  """
  _check_common(p, ridge_epsilon, method)
  a = _sym(jnp.asarray(matrix, jnp.float32))
  if method == "eigh":
    root, error, lam_max = _eigh_root(a, p, ridge_epsilon, relative_ridge)
    iters = 0
  else:
    root, error, lam_max, iters = _newton_root(a, p, ridge_epsilon, relative_ridge,
                                        num_newton_iters, newton_tolerance)
  finite = jnp.all(jnp.isfinite(root), axis=(-2, -1))
  ok = finite & jnp.isfinite(error) & (error <= failure_threshold)
  ok = ok & (lam_max > 0.0) & jnp.isfinite(lam_max)
  root = jnp.where(finite[..., None, None], root, 0.0)
  return RootResult(root, error, ok, jnp.asarray(iters, jnp.int32))


def safe_inverse_pth_root(
    matrix: jax.Array,
    previous: jax.Array,
    p: int,
    **kwargs,
) -> tuple[jax.Array, jax.Array]:
  """Like ``inverse_pth_root`` but keeps ``previous`` where the root failed.

  Args:
    matrix: ``(..., n, n)`` symmetric PSD matrices.
    previous: ``(..., n, n)`` roots to keep on failure (any float dtype).
    p: positive integer root order.
    **kwargs: forwarded to ``inverse_pth_root``.

  Returns:
    ``(root, failed)``: ``root`` has ``previous``'s dtype and is always
    finite when ``previous`` is; ``failed`` is a ``(...)`` bool array.
  """
  res = inverse_pth_root(matrix, p, **kwargs)
  root = jnp.where(res.ok[..., None, None], res.root,
                   previous.astype(jnp.float32))
  return root.astype(previous.dtype), jnp.logical_not(res.ok)
