"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker factors.

Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
<https://arxiv.org/abs/2409.11321>`_, 2024. Blocking, dim merging and the
packed statistics are shared with ``gradax.optimizers.shampoo``.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradax.optimizers import _tree
from gradax.optimizers import matrix_roots as _roots
# The module, not the `shampoo` function that the package re-exports.
_sh = importlib.import_module("gradax.optimizers.shampoo")

SOAP_STATIC_ARGS = ("block_size", "merge_small_dims_block_size",
                    "skip_preconditioning_dim_size_gt", "statistics_dtype",
                    "mu_dtype")


class SoapState(NamedTuple):
  """State of ``scale_by_soap``.

  Attributes:
    count: steps applied (the first one only initialises the bases); (),
      int32.
    skipped: steps skipped because the gradient was non-finite; (), int32.
    stats: per factor size n, ``(M_n, n(n+1)/2)`` packed Shampoo statistics.
    bases: per factor size n, ``(M_n, n, n)`` eigenbases (columns sorted by
      decreasing estimated eigenvalue).
    mu: Adam first moment in the original basis, like the params.
    nu: per block group, ``(B_g, *block)`` Adam second moment in the
      eigenbasis.
    nu_diag: Adam second moment of the parameters without factors (leaves of
      shape (0,) for the others).
  """
  count: jax.Array
  skipped: jax.Array
  stats: tuple[jax.Array, ...]
  bases: tuple[jax.Array, ...]
  mu: Any
  nu: tuple[jax.Array, ...]
  nu_diag: Any


def _project(plan, stacks, bases, back: bool):
  """Rotates each block stack into (or, with ``back``, out of) the eigenbasis.

  Rotating in, entries below the float32 error bound of the rotation,
  ``u * sum_j n_j * ||X||_F`` per block, are set to zero. They carry no
  signal (a direction the gradient does not touch comes out as round-off,
  ~1e-8 of ``||X||``), but Adam divides them by their own root mean square
  and would turn them into full-size steps in random directions, e.g. for a
  low-rank gradient or embedding rows absent from a batch.
  """
  out = []
  for gi, g in enumerate(plan.groups):
    x = y = stacks[gi]
    for j, n, start in g.factors:
      q = bases[plan.size_index(n)][start:start + g.nblocks].astype(jnp.float32)
      y = _sh.mode_product(y, q, j, transpose=not back)
    if not back:
      axes = tuple(range(1, y.ndim))
      norm = jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))
      tol = jnp.finfo(jnp.float32).eps * sum(n for _, n, _ in g.factors)
      y = jnp.where(jnp.abs(y) > tol * norm, y, 0.0)
    out.append(y)
  return out


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    precondition_every: int = 10,
    block_size: int | None = None,
    merge_small_dims_block_size: int | None = None,
    skip_preconditioning_dim_size_gt: int | None = None,
    statistics_dtype: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales updates by SOAP (Adam in Shampoo's eigenbasis), blocked.

  For each block :math:`G` with factors :math:`S_j` and eigenbases
  :math:`Q_j`, with :math:`\mathcal{Q}(X) = X \times_1 Q_1^\top \cdots
  \times_k Q_k^\top` and its inverse :math:`\mathcal{Q}^{-1}`:

  .. math::
    m &\leftarrow \beta_1 m + (1-\beta_1) G \quad\text{(original basis)}\\
    v &\leftarrow \beta_2 v + (1-\beta_2)\,\mathcal{Q}(G)^2
      \quad\text{(eigenbasis)}\\
    u &= \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
      \mathcal{Q}^{-1}\!\Big(\frac{\mathcal{Q}(m)}{\sqrt{v}+\epsilon}\Big)\\
    S_j &\leftarrow \beta_s S_j + (1-\beta_s) G_{(j)}G_{(j)}^\top
      \quad\text{(after the update)}.

  The first step sets :math:`S_j = G_{(j)}G_{(j)}^\top`, :math:`Q_j` from
  ``eigh`` and returns a zero update. Every ``precondition_every`` steps (in
  ``lax.cond``) each basis is refreshed by one QR power step: columns sorted
  by :math:`\mathrm{diag}(Q^\top S Q)` (and :math:`v` permuted the same way),
  then :math:`Q \leftarrow \mathrm{qr}(S Q)`. Parameters without factors get
  plain Adam. Non-finite gradients are skipped (zero update, state kept,
  ``skipped`` counted). Entries of :math:`\mathcal{Q}(G)` and
  :math:`\mathcal{Q}(m)` below the float32 error bound of the rotation
  (:math:`u\sum_j n_j\,\|X\|_F`) are taken as zero: Adam would otherwise
  scale that rounding noise up to full-size steps in directions the gradient
  never had (e.g. for a rank-1 gradient the exact update is rank 1).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    shampoo_beta: statistics decay :math:`\beta_s` (None: ``b2``).
    eps: Adam epsilon.
    precondition_every: steps between basis refreshes.
    block_size: largest block side (None: 128); see ``scale_by_shampoo``.
    merge_small_dims_block_size: see ``scale_by_shampoo``.
    skip_preconditioning_dim_size_gt: see ``scale_by_shampoo``.
    statistics_dtype: storage dtype of statistics and bases (None: float32).
    mu_dtype: storage dtype of the Adam moments (None: params' dtype).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = scale_by_soap()
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  chk = _tree.check_range
  chk("b1", b1, 0.0, 1.0, high_inclusive=False)
  chk("b2", b2, 0.0, 1.0, high_inclusive=False)
  if shampoo_beta is not None:
    chk("shampoo_beta", shampoo_beta, 0.0, 1.0, high_inclusive=False)
  chk("eps", eps, 0.0)
  block_size = 128 if block_size is None else block_size
  if merge_small_dims_block_size is None:
    merge_small_dims_block_size = block_size
  if skip_preconditioning_dim_size_gt is None:
    skip_preconditioning_dim_size_gt = 4096
  for name, v in (("block_size", block_size),
                  ("merge_small_dims_block_size", merge_small_dims_block_size),
                  ("skip_preconditioning_dim_size_gt",
                   skip_preconditioning_dim_size_gt)):
    _sh._check_int(name, v, 1, traced_ok=False)  # pylint: disable=protected-access
  _sh._check_int("precondition_every", precondition_every, 1)  # pylint: disable=protected-access
  sdt = jnp.float32 if statistics_dtype is None else statistics_dtype
  beta_s = b2 if shampoo_beta is None else shampoo_beta

  def plan_of(tree):
    return _sh.make_block_plan(_sh.leaf_shapes(tree), block_size,
                               merge_small_dims_block_size,
                               skip_preconditioning_dim_size_gt)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    plan = plan_of(params)
    stats = tuple(jnp.zeros((m, _sh.packed_size(n)), sdt)
                  for n, m in zip(plan.sizes, plan.counts))
    bases = tuple(jnp.tile(jnp.eye(n, dtype=sdt)[None], (m, 1, 1))
                  for n, m in zip(plan.sizes, plan.counts))
    dt = lambda x: mu_dtype or x.dtype
    mu = [jnp.zeros_like(x, dtype=dt(x)) for x in leaves]
    leaf_dt = jnp.result_type(*leaves) if leaves else jnp.float32
    nu = tuple(jnp.zeros((g.nblocks,) + g.block, mu_dtype or leaf_dt)
               for g in plan.groups)
    nu_diag = [jnp.zeros_like(x, dtype=dt(x)) if lp.diagonal
               else jnp.zeros((0,), dt(x)) for x, lp in zip(leaves, plan.leaves)]
    zero = jnp.zeros([], jnp.int32)
    return SoapState(zero, zero, stats, bases,
                     jax.tree.unflatten(treedef, mu), nu,
                     jax.tree.unflatten(treedef, nu_diag))

  def fresh_stats(plan, stacks):
    out = []
    for n in plan.sizes:
      rows = []
      for gi, g in enumerate(plan.groups):
        for j, fn, start in g.factors:
          if fn == n:
            rows.append((start, _sh.pack_sym(
                _sh.factor_statistic(stacks[gi], j))))
      rows.sort(key=lambda r: r[0])
      out.append(jnp.concatenate([r[1] for r in rows], axis=0))
    return out

  def eigh_bases(plan, stats):
    out = []
    for n, s in zip(plan.sizes, stats):
      a = _sh.unpack_sym(s.astype(jnp.float32), n)
      _, q = _roots.one_matrix_per_call_on_cpu(jnp.linalg.eigh, a)
      q = jnp.flip(q, axis=-1)  # decreasing eigenvalues
      q = jnp.where(jnp.all(jnp.isfinite(q), axis=(-2, -1), keepdims=True), q,
                    jnp.eye(n, dtype=q.dtype))
      out.append(q.astype(sdt))
    return tuple(out)

  def refresh(plan, stats, bases, nu):
    new_bases, perms = [], []
    for n, s, q in zip(plan.sizes, stats, bases):
      a = _sh.unpack_sym(s.astype(jnp.float32), n)
      q = q.astype(jnp.float32)
      est = jnp.einsum("zij,zik,zkj->zj", q, a, q, precision=_sh._HIGHEST)  # pylint: disable=protected-access
      order = jnp.argsort(-est, axis=-1)
      q_sorted = jnp.take_along_axis(q, order[:, None, :], axis=-1)
      q_new, _ = _roots.one_matrix_per_call_on_cpu(
          jnp.linalg.qr, jnp.einsum("zij,zjk->zik", a, q_sorted,
                                    precision=_sh._HIGHEST))  # pylint: disable=protected-access
      ok = jnp.all(jnp.isfinite(q_new), axis=(-2, -1), keepdims=True)
      new_bases.append(jnp.where(ok, q_new, q_sorted).astype(sdt))
      perms.append(order)
    new_nu = []
    for gi, g in enumerate(plan.groups):
      v = nu[gi]
      for j, n, start in g.factors:
        order = perms[plan.size_index(n)][start:start + g.nblocks]
        shape = [g.nblocks] + [1] * len(g.block)
        shape[1 + j] = n
        v = jnp.take_along_axis(v, order.reshape(shape), axis=1 + j)
      new_nu.append(v)
    return tuple(new_bases), tuple(new_nu)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return _tree.skip_nonfinite_step(
        updates, state, lambda: finite_step(updates, state))

  def finite_step(updates, state):
    leaves, treedef = jax.tree.flatten(updates)
    plan = plan_of(updates)
    leaves, shardings = _sh.replicate_leaves(leaves)
    g32 = [x.astype(jnp.float32) for x in leaves]
    mu_leaves, _ = _sh.replicate_leaves(jax.tree.leaves(state.mu))
    nud_leaves, _ = _sh.replicate_leaves(jax.tree.leaves(state.nu_diag))
    t = state.count
    is_first = t == 0
    g_stacks = _sh.stack_groups(plan, g32)

    new_mu = [b1 * m.astype(jnp.float32) + (1.0 - b1) * g
              for m, g in zip(mu_leaves, g32)]
    m_stacks = _sh.stack_groups(plan, new_mu)
    gp = _project(plan, g_stacks, state.bases, back=False)
    mp = _project(plan, m_stacks, state.bases, back=False)
    new_nu = [b2 * v.astype(jnp.float32) + (1.0 - b2) * x * x
              for v, x in zip(state.nu, gp)]
    scaled = [m / (jnp.sqrt(v) + eps) for m, v in zip(mp, new_nu)]
    dirs = _sh.unstack_groups(plan, _project(plan, scaled, state.bases,
                                             back=True))
    tf = jnp.maximum(t, 1).astype(jnp.float32)
    bias = jnp.sqrt(1.0 - b2 ** tf) / (1.0 - b1 ** tf)
    outs, new_nud = [], []
    for lp, g, m, vd, d in zip(plan.leaves, g32, new_mu, nud_leaves, dirs):
      if lp.diagonal:
        v = b2 * vd.astype(jnp.float32) + (1.0 - b2) * g * g
        new_nud.append(v)
        outs.append(bias * m / (jnp.sqrt(v) + eps))
      else:
        new_nud.append(vd)
        outs.append(bias * d)

    # Statistics after the step (the first step only sets them).
    if plan.sizes:
      fresh = fresh_stats(plan, g_stacks)
      w = jnp.where(is_first, 1.0, 1.0 - beta_s)
      stats = tuple(((1.0 - w) * s.astype(jnp.float32) + w * f).astype(s.dtype)
                    for s, f in zip(state.stats, fresh))
      nu_t = tuple(
          jnp.where(is_first, v, nv.astype(v.dtype))
          for v, nv in zip(state.nu, new_nu))
      refresh_due = (~is_first) & (t % precondition_every == 0)
      bases, nu_t = lax.cond(
          is_first, lambda: (eigh_bases(plan, stats), nu_t),
          lambda: lax.cond(refresh_due,
                           lambda: refresh(plan, stats, state.bases, nu_t),
                           lambda: (tuple(state.bases), nu_t)))
    else:
      stats, bases, nu_t = state.stats, state.bases, state.nu

    # The moments keep their value on the first step; the select sees the
    # leaf's own sharding.
    def keep_moment(new, old, sharding):
      new = _sh.restore_sharding(new.astype(old.dtype), sharding)
      return jnp.where(is_first, old, new)

    new_mu = [keep_moment(a, b, s) for a, b, s in
              zip(new_mu, jax.tree.leaves(state.mu), shardings)]
    new_nud = [keep_moment(a, b, s) if b.size else b
               for a, b, s in zip(new_nud, jax.tree.leaves(state.nu_diag),
                                  shardings)]
    outs = [_sh.restore_sharding(
        jnp.where(is_first, 0, o).astype(x.dtype), s)
            for o, x, s in zip(outs, jax.tree.leaves(updates), shardings)]
    new_state = SoapState(
        count=t + 1,
        skipped=state.skipped,
        stats=tuple(stats),
        bases=tuple(bases),
        mu=jax.tree.unflatten(treedef, new_mu),
        nu=tuple(nu_t),
        nu_diag=jax.tree.unflatten(treedef, new_nud))
    return jax.tree.unflatten(treedef, outs), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    weight_decay: float = 0.0,
    mask: Any = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP with decoupled weight decay, scaled by the learning rate.

  :math:`\theta \leftarrow \theta - \eta\,(u_{\text{soap}} + \lambda\theta)`
  with :math:`u_{\text{soap}}` from ``scale_by_soap`` (Vyas et al. 2024,
  arXiv 2409.11321; see there for the math).

  Args:
    learning_rate: a scalar or an optax schedule (reference default 3e-3).
    weight_decay: decoupled weight decay λ (>= 0).
    mask: optional pytree / callable choosing the leaves that decay.
    **kwargs: any argument of ``scale_by_soap`` (``b1``, ``b2``,
      ``shampoo_beta``, ``eps``, ``precondition_every``, ``block_size``, ...),
      with its defaults; keyword-only.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.soap(3e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  _tree.check_range("learning_rate", learning_rate, 0.0)
  txs = [scale_by_soap(**kwargs)]
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0.0):
    txs.append(optax.add_decayed_weights(weight_decay, mask))
  txs.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*txs)


soap.__signature__ = _sh.alias_signature(soap, scale_by_soap)
