"""Shampoo: blocked Kronecker-factored preconditioning with grafting.

Gupta, Koren, Singer, `Shampoo: Preconditioned Stochastic Tensor
Optimization <https://arxiv.org/abs/1802.09568>`_, 2018; practical form after
Anil et al., `Scalable Second Order Optimization for Deep Learning
<https://arxiv.org/abs/2002.09018>`_, 2020.

Layout (computed statically from the shapes): every parameter is squeezed,
its small dims merged, padded and cut into blocks; blocks of the same shape
are stacked, and every Kronecker factor of the same size ``n`` lives in one
``(M_n, n(n+1)/2)`` array of packed lower triangles. All roots of one size
are computed by one batched eigh / Newton call, which is also the unit that
distributed mode splits across the devices of a mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradax.optimizers import _tree
from gradax.optimizers import matrix_roots

GRAFT_TYPES = ("none", "sgd", "adagrad", "rmsprop", "adam", "adafactor")
# Arguments that fix array shapes; give them to optax.inject_hyperparams as
# static_args when you set them.
SHAMPOO_STATIC_ARGS = ("block_size", "merge_small_dims_block_size",
                       "skip_preconditioning_dim_size_gt", "exponent_override",
                       "statistics_dtype", "mu_dtype")
_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Static blocking plan (shared with SOAP).
# ----------------------------------------------------------------------------


def merge_small_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
  """Greedily merges consecutive dims whose product stays <= ``max_dim``.

  Size-1 dims disappear. ``[1, 2, 512, 1, 2048, 1, 3, 4]`` with 4096 becomes
  ``(1024, 2048, 12)``. A tensor with two or more non-trivial dims is never
  merged down to a vector: then the last dim is kept apart, so ``(6, 5)``
  stays a matrix.
  """
  dims = [d for d in shape if d != 1]

  def greedy(ds):
    out: list[int] = []
    for d in ds:
      if out and out[-1] * d <= max_dim:
        out[-1] *= d
      else:
        out.append(d)
    return out

  out = greedy(dims)
  if len(out) < 2 <= len(dims):
    out = greedy(dims[:-1]) + [dims[-1]]
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one parameter is cut into blocks."""
  shape: tuple[int, ...]        # original shape
  merged: tuple[int, ...]       # after squeezing and merging small dims
  diagonal: bool                # True: no Kronecker factors at all
  block: tuple[int, ...] = ()   # block shape
  grid: tuple[int, ...] = ()    # number of blocks along each dim
  precond: tuple[bool, ...] = ()  # which block dims get a factor
  group: int = -1               # index of the block group
  offset: int = 0               # first row in the block group's stack

  @property
  def nblocks(self) -> int:
    return int(np.prod(self.grid)) if self.grid else 0

  @property
  def padded(self) -> tuple[int, ...]:
    return tuple(b * n for b, n in zip(self.block, self.grid))


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  """Stacked blocks of one shape and factor pattern."""
  block: tuple[int, ...]
  precond: tuple[bool, ...]
  nblocks: int
  # For each preconditioned dim j: (factor size n, first row in size group).
  factors: tuple[tuple[int, int, int], ...]  # (j, n, start)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """The full static layout for a pytree of parameters."""
  leaves: tuple[LeafPlan, ...]
  groups: tuple[GroupPlan, ...]
  sizes: tuple[int, ...]        # factor sizes n, one packed array each
  counts: tuple[int, ...]       # number of n x n factors of each size

  def size_index(self, n: int) -> int:
    return self.sizes.index(n)


@functools.lru_cache(maxsize=256)
def make_block_plan(shapes: tuple[tuple[int, ...], ...], block_size: int,
                    merge_dims_size: int, skip_dim_size_gt: int) -> BlockPlan:
  """Builds the ``BlockPlan`` of a list of parameter shapes (static)."""
  raw = []
  for shape in shapes:
    merged = merge_small_dims(shape, merge_dims_size)
    precond = tuple(d <= skip_dim_size_gt for d in merged)
    if len(merged) < 2 or not any(precond):
      raw.append(LeafPlan(shape, merged, True))
      continue
    block = tuple(min(d, block_size) if p else d
                  for d, p in zip(merged, precond))
    grid = tuple(-(-d // b) for d, b in zip(merged, block))
    raw.append(LeafPlan(shape, merged, False, block, grid, precond))

  group_keys: list[tuple] = []
  group_counts: dict[tuple, int] = {}
  leaves = []
  for lp in raw:
    if lp.diagonal:
      leaves.append(lp)
      continue
    key = (lp.block, lp.precond)
    if key not in group_counts:
      group_keys.append(key)
      group_counts[key] = 0
    leaves.append(dataclasses.replace(
        lp, group=group_keys.index(key), offset=group_counts[key]))
    group_counts[key] += lp.nblocks

  size_counts: dict[int, int] = {}
  groups = []
  for key in group_keys:
    block, precond = key
    nb = group_counts[key]
    factors = []
    for j, (b, p) in enumerate(zip(block, precond)):
      if not p:
        continue
      start = size_counts.get(b, 0)
      factors.append((j, b, start))
      size_counts[b] = start + nb
    groups.append(GroupPlan(block, precond, nb, tuple(factors)))
  sizes = tuple(sorted(size_counts))
  return BlockPlan(tuple(leaves), tuple(groups), sizes,
                   tuple(size_counts[n] for n in sizes))


def to_blocks(x: jax.Array, lp: LeafPlan) -> jax.Array:
  """``x`` (shape ``lp.shape``) -> ``(nblocks, *lp.block)``, zero padded."""
  x = x.reshape(lp.merged)
  pad = [(0, p - d) for d, p in zip(lp.merged, lp.padded)]
  if any(p for _, p in pad):
    x = jnp.pad(x, pad)
  k = len(lp.block)
  inter = [v for n, b in zip(lp.grid, lp.block) for v in (n, b)]
  x = x.reshape(inter)
  x = x.transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])
  return x.reshape((lp.nblocks,) + lp.block)


def from_blocks(y: jax.Array, lp: LeafPlan) -> jax.Array:
  """Inverse of ``to_blocks``."""
  k = len(lp.block)
  y = y.reshape(lp.grid + lp.block)
  perm = [v for i in range(k) for v in (i, k + i)]
  y = y.transpose(perm).reshape(lp.padded)
  y = y[tuple(slice(0, d) for d in lp.merged)]
  return y.reshape(lp.shape)


@functools.lru_cache(maxsize=64)
def _tril(n: int):
  rows, cols = np.tril_indices(n)
  full = np.zeros((n, n), np.int32)
  full[rows, cols] = np.arange(rows.size)
  full[cols, rows] = np.arange(rows.size)
  return rows, cols, full


def pack_sym(a: jax.Array) -> jax.Array:
  """``(..., n, n)`` symmetric -> ``(..., n(n+1)/2)`` lower triangle."""
  rows, cols, _ = _tril(a.shape[-1])
  return a[..., rows, cols]


def unpack_sym(p: jax.Array, n: int) -> jax.Array:
  """Inverse of ``pack_sym``."""
  return p[..., _tril(n)[2]]


def packed_size(n: int) -> int:
  return n * (n + 1) // 2


def _letters(k):
  return string.ascii_lowercase[:k]


def factor_statistic(x: jax.Array, j: int) -> jax.Array:
  """``(B, *block)`` -> ``(B, b_j, b_j)``: contraction over all dims but j."""
  k = x.ndim - 1
  a = _letters(k)
  b = a[:j] + a[j].upper() + a[j + 1:]
  return jnp.einsum(f"z{a},z{b}->z{a[j]}{a[j].upper()}", x, x,
                    precision=_HIGHEST)


def mode_product(x: jax.Array, m: jax.Array, j: int,
                 transpose: bool = False) -> jax.Array:
  """Mode-j product ``x ×_j m``: ``y[.., i, ..] = Σ_l m[i, l] x[.., l, ..]``.

  ``x`` is ``(B, *block)`` and ``m`` is ``(B, n, n)`` with ``n = block[j]``.
  With ``transpose`` it uses ``mᵀ``.
  """
  k = x.ndim - 1
  a = _letters(k)
  out = a[:j] + a[j].upper() + a[j + 1:]
  ms = f"z{a[j]}{a[j].upper()}" if transpose else f"z{a[j].upper()}{a[j]}"
  return jnp.einsum(f"z{a},{ms}->z{out}", x, m, precision=_HIGHEST)


def leaf_shapes(tree: Any) -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(x.shape) for x in jax.tree.leaves(tree))


def stack_groups(plan: BlockPlan, leaves: list[jax.Array]) -> list[jax.Array]:
  """Blocks every non-diagonal leaf and concatenates them per group."""
  parts: list[list[jax.Array]] = [[] for _ in plan.groups]
  for x, lp in zip(leaves, plan.leaves):
    if not lp.diagonal:
      parts[lp.group].append(to_blocks(x, lp))
  return [p[0] if len(p) == 1 else jnp.concatenate(p, axis=0) for p in parts]


def unstack_groups(plan: BlockPlan, stacks: list[jax.Array]) -> list[Any]:
  """Inverse of ``stack_groups``; diagonal leaves come back as None."""
  out = []
  for lp in plan.leaves:
    if lp.diagonal:
      out.append(None)
    else:
      y = stacks[lp.group][lp.offset:lp.offset + lp.nblocks]
      out.append(from_blocks(y, lp))
  return out


def replicate_leaves(leaves: list[jax.Array]):
  """Replicates explicitly sharded leaves; returns them and their shardings."""
  shardings = [_tree.explicit_sharding(x) for x in leaves]
  out = []
  for x, s in zip(leaves, shardings):
    if s is not None:
      x = jax.sharding.reshard(
          x, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()))
    out.append(x)
  return out, shardings


def restore_sharding(x: jax.Array, sharding) -> jax.Array:
  return x if sharding is None else jax.sharding.reshard(x, sharding)


def sharded_map_over_stack(fn, arrays, axis_name: str | None):
  """Applies ``fn`` to stacked arrays, split over ``axis_name`` when given.

  ``fn`` maps arrays with a leading axis of size M to outputs with the same
  leading axis. With ``axis_name`` (inside ``shard_map``) each device takes a
  contiguous share of the (zero-padded) leading axis and the results are
  all-gathered, so each device does about 1/n of the work.
  """
  if axis_name is None:
    return fn(*arrays)
  n_dev = lax.axis_size(axis_name)
  m = arrays[0].shape[0]
  chunk = -(-m // n_dev)
  padded = []
  for a in arrays:
    pad = chunk * n_dev - m
    if pad:
      a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
    padded.append(a)
  start = lax.axis_index(axis_name) * chunk
  local = [lax.dynamic_slice_in_dim(a, start, chunk, axis=0) for a in padded]
  outs = fn(*local)
  gathered = jax.tree.map(
      lambda o: lax.all_gather(o, axis_name, tiled=True, to="invarying")[:m],
      outs)
  return gathered


# ----------------------------------------------------------------------------
# Shampoo.
# ----------------------------------------------------------------------------


class ShampooState(NamedTuple):
  """State of ``scale_by_shampoo``.

  Attributes:
    count: steps applied (skipped steps excluded); shape (), int32.
    skipped: steps skipped because the gradient was non-finite; (), int32.
    root_failures: roots of non-zero statistics that failed and kept the
      previous root; (), int32.
    stats: per factor size n, ``(M_n, n(n+1)/2)`` packed statistics.
    roots: per factor size n, ``(M_n, n(n+1)/2)`` packed inverse roots.
    mu: momentum, like the params (leaves of shape (0,) when ``beta1 == 0``).
    nu: graft / diagonal second moment, like the params (leaves of shape (0,)
      where it is not needed, e.g. where ``nu_row``/``nu_col`` replace it).
    nu_row: ``graft_type="adafactor"``: per preconditioned leaf with merged
      shape ``(..., a, b)``, the EMA of the row sums of g², shape
      ``(..., a)``; (0,) elsewhere.
    nu_col: likewise the EMA of the column sums, shape ``(..., b)``.
  """
  count: jax.Array
  skipped: jax.Array
  root_failures: jax.Array
  stats: tuple[jax.Array, ...]
  roots: tuple[jax.Array, ...]
  mu: Any
  nu: Any
  nu_row: Any
  nu_col: Any


def _check_int(name, v, low, traced_ok=True):
  """Integer argument check; traced values (inject_hyperparams) pass."""
  if isinstance(v, jax.core.Tracer):
    if traced_ok:
      return
    raise ValueError(
        f"{name} sets array shapes and must be static; with "
        f"optax.inject_hyperparams pass static_args=({name!r}, ...).")
  if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
    if traced_ok:
      v = v.item()
    else:
      raise ValueError(
          f"{name} sets array shapes and must be a Python int; with "
          f"optax.inject_hyperparams pass static_args=({name!r}, ...).")
  if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
    raise ValueError(f"{name} must be an integer >= {low}; got {name}={v!r}.")


def _validate(**kw):
  chk = _tree.check_range
  chk("beta1", kw["beta1"], 0.0, 1.0, high_inclusive=False)
  chk("beta2", kw["beta2"], 0.0, 1.0, low_inclusive=False)
  chk("graft_beta2", kw["graft_beta2"], 0.0, 1.0, high_inclusive=False)
  chk("diagonal_epsilon", kw["diagonal_epsilon"], 0.0, None,
      low_inclusive=False)
  chk("matrix_epsilon", kw["matrix_epsilon"], 0.0)
  for name in ("block_size", "merge_small_dims_block_size",
               "skip_preconditioning_dim_size_gt"):
    _check_int(name, kw[name], 1, traced_ok=False)
  _check_int("precondition_every", kw["precondition_every"], 1)
  _check_int("statistics_every", kw["statistics_every"], 1)
  _check_int("start_preconditioning_step", kw["start_preconditioning_step"], 0)
  if kw["graft_type"] not in GRAFT_TYPES:
    raise ValueError(f"graft_type must be one of {GRAFT_TYPES}; got "
                     f"graft_type={kw['graft_type']!r}.")
  if kw["root_method"] not in matrix_roots.METHODS:
    raise ValueError(f"root_method must be one of {matrix_roots.METHODS}; "
                     f"got root_method={kw['root_method']!r}.")
  if kw["exponent_override"] is not None:
    _check_int("exponent_override", kw["exponent_override"], 1,
               traced_ok=False)
  v = kw["axis_name"]
  if v is not None and not isinstance(v, str):
    raise ValueError(f"axis_name must be None or a mesh-axis name; got "
                     f"axis_name={v!r}.")


def _bias_correct(beta, t):
  return 1.0 - beta ** t.astype(jnp.float32)


def factored_second_moment(g, row, col, beta):
  """Adafactor's rank-1 second moment over the last two dims of ``g``.

  Shazeer & Stern 2018 (arXiv 1804.04235), Alg. 4 without ε1: ``row`` and
  ``col`` are EMAs of the row sums ``Σ_j g²`` (shape ``(..., a)``) and column
  sums ``Σ_i g²`` (shape ``(..., b)``); the estimate is
  ``v_ij = row_i col_j / Σ_i row_i`` (0 where the row sums are all 0).
  Returns ``(v, row, col)``, all in float32, ``v`` shaped like ``g``.
  """
  g2 = jnp.square(g)
  row = beta * row.astype(jnp.float32) + (1.0 - beta) * jnp.sum(g2, -1)
  col = beta * col.astype(jnp.float32) + (1.0 - beta) * jnp.sum(g2, -2)
  total = jnp.sum(row, -1, keepdims=True)[..., None]
  v = row[..., :, None] * col[..., None, :] / jnp.where(total > 0, total, 1.0)
  return v, row, col


def scale_by_shampoo(
    beta1: float = 0.9,
    beta2: float = 0.999,
    diagonal_epsilon: float = 1e-8,
    matrix_epsilon: float = 1e-6,
    block_size: int | None = None,
    merge_small_dims_block_size: int | None = None,
    skip_preconditioning_dim_size_gt: int | None = None,
    precondition_every: int = 10,
    statistics_every: int = 1,
    start_preconditioning_step: int = 5,
    graft_type: str = "adafactor",
    graft_beta2: float = 0.999,
    nesterov: bool = True,
    exponent_override: int | None = None,
    root_method: str = "newton",
    relative_matrix_epsilon: bool = True,
    failure_threshold: float = 0.1,
    statistics_dtype: Any = None,
    mu_dtype: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales updates by blocked Shampoo with layer-wise norm grafting.

  For a block :math:`G` of an order-k tensor, with one statistic per
  preconditioned dim :math:`j`,

  .. math::
    S_j &\leftarrow \beta_2 S_j + (1-\beta_2)\,G_{(j)} G_{(j)}^\top
      \quad(\text{or } S_j + G_{(j)}G_{(j)}^\top \text{ when } \beta_2 = 1)\\
    P_j &= (S_j + \epsilon\lambda_{\max}(S_j) I)^{-1/p},\quad p = 2k\\
    D &= G \times_1 P_1 \times_2 \cdots \times_k P_k,

  where :math:`G_{(j)}` is the mode-j unfolding. Per parameter (layer), the
  Shampoo direction is grafted to the norm of a diagonal optimizer's
  direction :math:`g_{\text{graft}}`: :math:`u = D\,\|g_{\text{graft}}\| /
  \|D\|` (``graft_type="none"`` uses :math:`D` as is). Then momentum:
  :math:`m \leftarrow \beta_1 m + (1-\beta_1)u`, output
  :math:`\hat m = m/(1-\beta_1^t)` (or the Nesterov form).

  The default graft, ``"adafactor"``, is Adam (no momentum) with Adafactor's
  factored second moment (Shazeer & Stern 2018): for a preconditioned
  parameter of merged shape :math:`(\ldots, a, b)`, with
  :math:`\beta = ` ``graft_beta2``,

  .. math::
    r &\leftarrow \beta r + (1-\beta)\textstyle\sum_j G_{ij}^2,\quad
    c \leftarrow \beta c + (1-\beta)\sum_i G_{ij}^2,\quad
    \hat v_{ij} = \frac{r_i c_j}{\sum_i r_i\,(1-\beta^t)}\\
    g_{\text{graft}} &= G / (\sqrt{\hat v} + \epsilon_{\text{diag}}),

  over the last two dims, which stores :math:`a + b` numbers per
  :math:`a \times b` slice instead of :math:`ab` (``graft_type="adam"`` keeps the full :math:`v`). Only the
  layer's norm of :math:`g_{\text{graft}}` reaches the update once Shampoo
  runs; before that, it is the update.

  Statistics are updated every ``statistics_every`` steps; roots are
  recomputed every ``precondition_every`` steps (first at step
  ``start_preconditioning_step - 1``), inside ``lax.cond``; before
  ``start_preconditioning_step`` the grafted diagonal direction is used.
  Parameters with fewer than 2 dims after merging, or whose dims all exceed
  ``skip_preconditioning_dim_size_gt``, use the graft direction (or, for
  ``graft_type`` none/sgd/adafactor, Adam's direction with its full second
  moment and ``graft_beta2``). A root that fails (non-finite,
  :math:`\lambda_{\max}=0`, or error above ``failure_threshold``) keeps the
  previous root, and a step whose gradient has a non-finite value returns
  zeros and leaves the state untouched except for the ``skipped`` counter.

  References: Gupta et al., `Shampoo <https://arxiv.org/abs/1802.09568>`_,
  2018; Anil et al., `Scalable Second Order Optimization
  <https://arxiv.org/abs/2002.09018>`_, 2020; Shazeer & Stern, `Adafactor
  <https://arxiv.org/abs/1804.04235>`_, 2018 (factored graft).

  Args:
    beta1: momentum decay (0 disables momentum and its state).
    beta2: statistics EMA decay; 1.0 accumulates a plain sum.
    diagonal_epsilon: epsilon of the diagonal (graft) optimizer.
    matrix_epsilon: ridge ε added to each statistic before the root.
    block_size: largest block side; larger dims are split (zero padded).
      None means 128. Shape arguments (this, the next two and
      ``exponent_override``) must be static: with
      ``optax.inject_hyperparams`` pass them in ``static_args``
      (``SHAMPOO_STATIC_ARGS``).
    merge_small_dims_block_size: merge adjacent dims while the product is at
      most this (None: ``block_size``).
    skip_preconditioning_dim_size_gt: dims larger than this get no factor
      (None means 4096).
    precondition_every: steps between root recomputations.
    statistics_every: steps between statistics updates.
    start_preconditioning_step: the first step that uses Shampoo (5 and
      ``nesterov=True`` are the defaults of google-research/precondition's
      ``distributed_shampoo``).
    graft_type: one of ``none, sgd, adagrad, rmsprop, adam, adafactor``.
      ``adafactor`` (default) is ``adam`` with the factored second moment
      above; 1-D and diagonal parameters keep Adam's full one. On char_lm
      it cuts f32 state from 4.59x to 3.63x the param bytes with the same
      steps to AdamW's loss (``experiments/benchmarks/shampoo.py``).
    graft_beta2: second-moment decay of rmsprop/adam/adafactor grafting.
    nesterov: use Nesterov momentum (default True, as in precondition).
    exponent_override: root order p for every factor (default 2k).
    root_method: ``"eigh"`` or ``"newton"`` (coupled Newton).
    relative_matrix_epsilon: scale the ridge by :math:`\lambda_{\max}`.
    failure_threshold: root error above which the previous root is kept.
    statistics_dtype: storage dtype of statistics and roots (None: float32;
      roots are always computed in float32). Dtypes are callables, so with
      ``optax.inject_hyperparams`` list them in ``static_args``.
    mu_dtype: storage dtype of momentum and second moments, factored ones
      included (default: the params' dtype).
    axis_name: when called inside ``shard_map`` over this axis, the root
      computations are split across its devices and all-gathered.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = scale_by_shampoo(block_size=64)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  block_size = 128 if block_size is None else block_size
  if merge_small_dims_block_size is None:
    merge_small_dims_block_size = block_size
  if skip_preconditioning_dim_size_gt is None:
    skip_preconditioning_dim_size_gt = 4096
  _validate(beta1=beta1, beta2=beta2, graft_beta2=graft_beta2,
            diagonal_epsilon=diagonal_epsilon, matrix_epsilon=matrix_epsilon,
            block_size=block_size, precondition_every=precondition_every,
            statistics_every=statistics_every,
            merge_small_dims_block_size=merge_small_dims_block_size,
            skip_preconditioning_dim_size_gt=skip_preconditioning_dim_size_gt,
            start_preconditioning_step=start_preconditioning_step,
            graft_type=graft_type, root_method=root_method,
            exponent_override=exponent_override, axis_name=axis_name)
  _tree.check_range("failure_threshold", failure_threshold, 0.0, None,
                    low_inclusive=False)
  # A traced beta1 (inject_hyperparams) keeps the momentum buffer.
  statistics_dtype = jnp.float32 if statistics_dtype is None else (
      statistics_dtype)
  use_mu = not (_tree.is_concrete_number(beta1) and float(beta1) == 0.0)
  graft_has_nu = graft_type in ("adagrad", "rmsprop", "adam", "adafactor")

  def plan_of(tree):
    return make_block_plan(leaf_shapes(tree), block_size,
                           merge_small_dims_block_size,
                           skip_preconditioning_dim_size_gt)

  def factored(lp):
    # Diagonal leaves use the graft direction as their update, so they keep
    # the exact elementwise second moment.
    return graft_type == "adafactor" and not lp.diagonal

  def needs_nu(lp):
    return (graft_has_nu and not factored(lp)) or lp.diagonal

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    plan = plan_of(params)
    stats, roots = [], []
    for n, m in zip(plan.sizes, plan.counts):
      stats.append(jnp.zeros((m, packed_size(n)), statistics_dtype))
      eye = pack_sym(jnp.eye(n, dtype=statistics_dtype))
      roots.append(jnp.tile(eye[None], (m, 1)))

    def moment(x, needed):
      dt = mu_dtype or x.dtype
      return jnp.zeros_like(x, dtype=dt) if needed else jnp.zeros((0,), dt)

    def sums(x, lp, shape):
      # Row / column sums of the merged shape (..., a, b) for a factored graft.
      return jnp.zeros(shape if factored(lp) else (0,), mu_dtype or x.dtype)

    mu = [moment(x, use_mu) for x in leaves]
    nu = [moment(x, needs_nu(lp)) for x, lp in zip(leaves, plan.leaves)]
    rows = [sums(x, lp, lp.merged[:-1]) for x, lp in zip(leaves, plan.leaves)]
    cols = [sums(x, lp, lp.merged[:-2] + lp.merged[-1:])
            for x, lp in zip(leaves, plan.leaves)]
    zero = jnp.zeros([], jnp.int32)
    tree = functools.partial(jax.tree.unflatten, treedef)
    return ShampooState(zero, zero, zero, tuple(stats), tuple(roots),
                        tree(mu), tree(nu), tree(rows), tree(cols))

  def root_order(k):
    return exponent_override if exponent_override is not None else 2 * k

  def compute_roots(plan, stats, roots):
    new_roots, failures = [], jnp.zeros([], jnp.int32)
    # The root order depends on the tensor order k; group rows by it.
    order_of_rows = []
    for n in plan.sizes:
      orders = np.zeros(plan.counts[plan.size_index(n)], np.int32)
      for g in plan.groups:
        for j, fn, start in g.factors:
          if fn == n:
            orders[start:start + g.nblocks] = root_order(len(g.block))
      order_of_rows.append(orders)
    for n, s, r, orders in zip(plan.sizes, stats, roots, order_of_rows):
      distinct = sorted(set(orders.tolist()))

      def fn(s_local, r_local, o_local, n=n, distinct=distinct):
        a = unpack_sym(s_local, n).astype(jnp.float32)
        prev = unpack_sym(r_local, n).astype(jnp.float32)
        out, failed = prev, jnp.zeros(s_local.shape[:1], bool)
        for p in distinct:
          root, fail = matrix_roots.safe_inverse_pth_root(
              a, prev, int(p), method=root_method,
              ridge_epsilon=matrix_epsilon,
              relative_ridge=relative_matrix_epsilon,
              failure_threshold=failure_threshold)
          sel = o_local == p
          out = jnp.where(sel[:, None, None], root, out)
          failed = jnp.where(sel, fail, failed)
        # Padding rows (order 0) are never used, and all-zero statistics (a
        # block that never saw a gradient) keep their root by design: neither
        # counts as a failure.
        failed = failed & (o_local > 0) & jnp.any(a != 0, axis=(-2, -1))
        return pack_sym(out).astype(r_local.dtype), failed.astype(jnp.int32)

      root, failed = sharded_map_over_stack(
          fn, [s, r, jnp.asarray(orders)], axis_name)
      new_roots.append(root)
      failures = failures + jnp.sum(failed)
    return tuple(new_roots), failures

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return _tree.skip_nonfinite_step(
        updates, state, lambda: finite_step(updates, state))

  def finite_step(updates, state):
    leaves, treedef = jax.tree.flatten(updates)
    plan = plan_of(updates)
    leaves, shardings = replicate_leaves(leaves)
    g32 = [x.astype(jnp.float32) for x in leaves]
    t = state.count
    t1 = t + 1
    mu_leaves = jax.tree.leaves(state.mu)
    nu_leaves = jax.tree.leaves(state.nu)
    nu_leaves, _ = replicate_leaves(nu_leaves)
    mu_leaves, _ = replicate_leaves(mu_leaves)

    stacks = stack_groups(plan, g32)

    # Statistics.
    def new_stats():
      out = []
      for si, n in enumerate(plan.sizes):
        rows = []
        for gi, g in enumerate(plan.groups):
          for j, fn, start in g.factors:
            if fn == n:
              rows.append((start, pack_sym(factor_statistic(stacks[gi], j))))
        rows.sort(key=lambda r: r[0])
        fresh = jnp.concatenate([r[1] for r in rows], axis=0)
        old = state.stats[si].astype(jnp.float32)
        # beta2 == 1 accumulates a sum (works for a traced beta2 too).
        w_new = jnp.where(beta2 == 1.0, 1.0, 1.0 - beta2)
        val = beta2 * old + w_new * fresh
        out.append(val.astype(state.stats[si].dtype))
      return tuple(out)

    stats_due = t % statistics_every == 0
    if plan.sizes:
      stats = lax.cond(stats_due, new_stats, lambda: state.stats)
    else:
      stats = state.stats

    # Roots.
    first = jnp.maximum(start_preconditioning_step - 1, 0)
    roots_due = (t >= first) & ((t - first) % precondition_every == 0)
    if plan.sizes:
      roots, failures = lax.cond(
          roots_due, lambda: compute_roots(plan, stats, state.roots),
          lambda: (state.roots, jnp.zeros([], jnp.int32)))
    else:
      roots, failures = state.roots, jnp.zeros([], jnp.int32)

    # Shampoo directions.
    full_roots = [unpack_sym(r, n).astype(jnp.float32)
                  for n, r in zip(plan.sizes, roots)]
    pre_stacks = []
    for gi, g in enumerate(plan.groups):
      y = stacks[gi]
      for j, n, start in g.factors:
        r = full_roots[plan.size_index(n)][start:start + g.nblocks]
        y = mode_product(y, r, j)
      pre_stacks.append(y)
    shampoo_dirs = unstack_groups(plan, pre_stacks)

    use_shampoo = t >= start_preconditioning_step
    new_nu, new_row, new_col, outs = [], [], [], []
    for lp, g, nu, nr, nc, d in zip(plan.leaves, g32, nu_leaves,
                                    jax.tree.leaves(state.nu_row),
                                    jax.tree.leaves(state.nu_col),
                                    shampoo_dirs):
      # Diagonal (graft) direction.
      if factored(lp):
        v, r32, c32 = factored_second_moment(
            g.reshape(lp.merged), nr, nc, graft_beta2)
        denom = jnp.sqrt(v.reshape(g.shape) / _bias_correct(graft_beta2, t1))
        diag = g / (denom + diagonal_epsilon)
        new_nu.append(nu)
        new_row.append(r32.astype(nr.dtype))
        new_col.append(c32.astype(nc.dtype))
      elif needs_nu(lp):
        kind = graft_type if graft_type in ("adagrad", "rmsprop") else "adam"
        nu32 = nu.astype(jnp.float32)
        if kind == "adagrad":
          nu32 = nu32 + g * g
          denom = jnp.sqrt(nu32)
        else:
          b = graft_beta2
          nu32 = b * nu32 + (1.0 - b) * g * g
          denom = jnp.sqrt(nu32 / _bias_correct(b, t1)) if kind == "adam" \
              else jnp.sqrt(nu32)
        diag = g / (denom + diagonal_epsilon)
        new_nu.append(nu32.astype(nu.dtype))
      else:
        diag = g
        new_nu.append(nu)
      if not factored(lp):
        new_row.append(nr)
        new_col.append(nc)
      if lp.diagonal:
        outs.append(diag)
        continue
      if graft_type == "none":
        u = d
      else:
        dn = jnp.linalg.norm(d)
        gn = jnp.linalg.norm(diag)
        u = d * jnp.where(dn > 0, gn / jnp.where(dn > 0, dn, 1.0), 0.0)
      outs.append(jnp.where(use_shampoo, u, diag))

    # Momentum.
    new_mu = []
    if use_mu:
      final = []
      for u, m in zip(outs, mu_leaves):
        m32 = beta1 * m.astype(jnp.float32) + (1.0 - beta1) * u
        if nesterov:
          o = (beta1 * m32 / _bias_correct(beta1, t1 + 1)
               + (1.0 - beta1) * u / _bias_correct(beta1, t1))
        else:
          o = m32 / _bias_correct(beta1, t1)
        final.append(o)
        new_mu.append(m32.astype(m.dtype))
      outs = final
    else:
      new_mu = mu_leaves

    # Moments get their leaf's sharding back; row / column sums are small and
    # stay replicated, like the statistics.
    new_mu = [restore_sharding(a, s) if a.size else b
              for a, b, s in zip(new_mu, jax.tree.leaves(state.mu), shardings)]
    new_nu = [restore_sharding(a, s) if a.size else b
              for a, b, s in zip(new_nu, jax.tree.leaves(state.nu), shardings)]
    outs = [restore_sharding(o.astype(x.dtype), s)
            for o, x, s in zip(outs, jax.tree.leaves(updates), shardings)]
    new_state = ShampooState(
        count=t + 1,
        skipped=state.skipped,
        root_failures=state.root_failures + failures,
        stats=tuple(stats),
        roots=tuple(roots),
        mu=jax.tree.unflatten(treedef, new_mu),
        nu=jax.tree.unflatten(treedef, new_nu),
        nu_row=jax.tree.unflatten(treedef, new_row),
        nu_col=jax.tree.unflatten(treedef, new_col))
    return jax.tree.unflatten(treedef, outs), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    mask: Any = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Shampoo with decoupled weight decay, scaled by the learning rate.

  :math:`\theta \leftarrow \theta - \eta\,(u_{\text{shampoo}} +
  \lambda\theta)`, where :math:`u_{\text{shampoo}}` is the output of
  ``scale_by_shampoo`` (Gupta et al. 2018, arXiv 1802.09568; see there for
  the math and for every other argument).

  Args:
    learning_rate: a scalar or an optax schedule.
    weight_decay: decoupled weight decay λ (>= 0).
    mask: optional pytree / callable choosing the leaves that decay.
    **kwargs: any argument of ``scale_by_shampoo`` (``beta1``, ``beta2``,
      ``block_size``, ``precondition_every``, ``graft_type``, ...), with its
      defaults; keyword-only.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = gradax.optimizers.shampoo(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params)
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  _tree.check_range("learning_rate", learning_rate, 0.0)
  txs = [scale_by_shampoo(**kwargs)]
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0.0):
    txs.append(optax.add_decayed_weights(weight_decay, mask))
  txs.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*txs)


def alias_signature(alias, scale_fn) -> inspect.Signature:
  """``alias``'s own parameters, then ``scale_fn``'s as keyword-only ones.

  The ``<name>(learning_rate, weight_decay, mask, **kwargs)`` aliases forward
  their keywords to ``scale_by_<name>``; setting this as their
  ``__signature__`` lists every hyperparameter with its default, which is
  what ``optax.inject_hyperparams`` and the runner read.
  """
  own = [p for p in inspect.signature(alias).parameters.values()
         if p.kind is not p.VAR_KEYWORD]
  rest = [p.replace(kind=p.KEYWORD_ONLY)
          for p in inspect.signature(scale_fn).parameters.values()]
  return inspect.Signature(own + rest,
                           return_annotation=inspect.signature(
                               alias).return_annotation)


shampoo.__signature__ = alias_signature(shampoo, scale_by_shampoo)


def state_nbytes(state: Any) -> int:
  """Exact bytes of every array in an optimizer state."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
                 if hasattr(x, "dtype")))

