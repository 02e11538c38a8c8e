"""Streaming DiLoCo: fragment-wise, staggered, overlapped outer syncs.

The flattened parameters are split into p contiguous fragments. Fragment j
syncs at inner steps t with t mod H = ((j+1)·H/p) mod H, so peak traffic is
1/p of DiLoCo's; its sync is DiLoCo's (pseudo-gradient Δ_j = θ_global,j −
θ_m,j, mean, outer step) on that fragment only. With overlap τ > 0 the
all-reduce overlaps τ further inner steps, after which the late global
fragment is mixed into the local one,

    θ_m,j ← α·θ_m,j + (1 − α)·θ_global,j .

With p = 1, τ = 0, α = 0 it is DiLoCo.

Paper: Douillard et al., "Streaming DiLoCo with overlapping communication:
Towards a Distributed Free Lunch", 2025, arXiv 2501.18512 (constraints as in
torchft: H mod p = 0 and τ < H/p).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from gradax.distributed.data_parallel import (
    TrainAlgorithm, as_reducer, num_elements)
from gradax.distributed.diloco import default_outer_optimizer
from gradax.distributed.local_sgd import Sync, check_period, local_update


def fragment_bounds(d: int, num_fragments: int) -> list[tuple[int, int]]:
  """Contiguous, near-equal ``[start, end)`` ranges covering ``d`` elements."""
  cuts = np.linspace(0, d, num_fragments + 1).round().astype(int)
  return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def streaming_diloco(
    loss_fn: Callable[[Any, Any], jax.Array],
    inner_optimizer: optax.GradientTransformation,
    mesh: Mesh,
    sync_every: int = 100,
    *,
    num_fragments: int = 4,
    overlap_steps: int | None = None,
    alpha: float = 0.5,
    outer_optimizer: optax.GradientTransformation | None = None,
    compressor: Any = None,
    axis_name: str = "data",
    microbatches: int = 1,
) -> TrainAlgorithm:
  """Streaming DiLoCo on ``mesh``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    inner_optimizer: any optax optimizer (per replica).
    mesh: mesh with the replica axis.
    sync_every: H, steps between two syncs of the same fragment (>= 1).
    num_fragments: p >= 1, dividing H.
    overlap_steps: τ, inner steps the fragment all-reduce overlaps,
      0 <= τ < H/p; default 1 (0 when H/p = 1).
    alpha: local weight α in [0, 1] of the mix after the overlap.
    outer_optimizer: default SGD(0.7, Nesterov 0.9), one state per fragment.
    compressor: optional compressor for the fragment pseudo-gradients.
    axis_name: the replica axis.
    microbatches: micro-batches per inner step.

  Returns:
    A ``TrainAlgorithm`` named ``"streaming_diloco"`` (``round`` runs H steps).

  Example:
    >>> alg = streaming_diloco(loss, optax.adamw(1e-3), mesh, 100,
    ...                        num_fragments=4, overlap_steps=1)
    >>> state = alg.init(params)
  """
  H = check_period(sync_every)
  if not isinstance(num_fragments, int) or num_fragments < 1 or (
      H % num_fragments):
    raise ValueError(
        f"num_fragments={num_fragments!r}; must be an integer >= 1 that "
        f"divides sync_every={H}.")
  every = H // num_fragments
  if overlap_steps is None:
    overlap_steps = min(1, every - 1)
  if not isinstance(overlap_steps, int) or not 0 <= overlap_steps < every:
    raise ValueError(
        f"overlap_steps={overlap_steps!r}; must be an integer in "
        f"[0, {every - 1}] (below sync_every/num_fragments = {every}).")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha!r}; must be in [0, 1].")
  outer = default_outer_optimizer() if outer_optimizer is None else (
      outer_optimizer)
  red = as_reducer("mean" if compressor is None else compressor)
  tau = overlap_steps

  def frags(params):
    return fragment_bounds(num_elements(params), num_fragments)

  def init(params):
    flat = ravel_pytree(params)[0].astype(jnp.float32)
    return params, tuple(outer.init(flat[a:b]) for a, b in frags(params))

  def init_replica(params):
    return tuple(red.init(jnp.zeros((b - a,), jnp.float32), axis_name)
                 for a, b in frags(params))

  def sync(params, inner_state, s, r, step):
    flat, unravel = ravel_pytree(params)
    dtype = flat.dtype
    flat = flat.astype(jnp.float32)
    global_params, ostates = s
    g = ravel_pytree(global_params)[0].astype(jnp.float32)
    ostates, r = list(ostates), list(r)
    pos = step % H
    for j, (a, b) in enumerate(frags(params)):
      t_sync = ((j + 1) * every) % H

      def do_sync(flat, g, o, rj, a=a, b=b):
        delta = g[a:b] - flat[a:b]
        delta, rj = red.reduce(delta, rj, axis_name)
        upd, o = outer.update(delta, o, g[a:b])
        g = g.at[a:b].set(g[a:b] + upd)
        if tau == 0:
          flat = flat.at[a:b].set(alpha * flat[a:b] + (1 - alpha) * g[a:b])
        return flat, g, o, rj

      flat, g, ostates[j], r[j] = lax.cond(
          pos == t_sync, do_sync, lambda *x: x, flat, g, ostates[j], r[j])
      if tau:
        def mix(flat, g, a=a, b=b):
          return flat.at[a:b].set(alpha * flat[a:b] + (1 - alpha) * g[a:b])
        due = (pos == (t_sync + tau) % H) & (step - tau >= (j + 1) * every)
        flat = lax.cond(due, mix, lambda f, g: f, flat, g)
    params = unravel(flat.astype(dtype))
    global_params = jax.tree.map(lambda u, p: u.astype(p.dtype),
                                 unravel(g.astype(dtype)), global_params)
    return params, inner_state, (global_params, tuple(ostates)), tuple(r)

  def nbytes(d, n):
    return sum(red.nbytes(b - a, n) for a, b in fragment_bounds(d, num_fragments))

  return local_update(
      "streaming_diloco", loss_fn, inner_optimizer, mesh,
      Sync(init, init_replica, sync, lambda s, r: s[0], nbytes,
           every_step=True),
      H, axis_name=axis_name, microbatches=microbatches)
