"""DiLoCo: distributed low-communication training with an outer optimizer.

Every H inner steps each replica m sends its pseudo-gradient

    Δ_m = θ_global − θ_m ,      Δ̄ = (1/n) Σ_m C(Δ_m)   (C: optional compressor)

and every replica applies the same outer step θ_global ← θ_global +
OuterOpt(Δ̄), then restarts from θ_m ← θ_global. The inner optimizer state
stays local across rounds. Defaults follow the paper and INTELLECT-1: outer
SGD with Nesterov momentum 0.9 and learning rate 0.7.

Paper: Douillard et al., "DiLoCo: Distributed Low-Communication Training of
Language Models", 2023, arXiv 2311.08105; int8 pseudo-gradients as in
INTELLECT-1 (Jaghouar et al., 2024, arXiv 2412.01152).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gradax.distributed.data_parallel import (
    TrainAlgorithm, as_reducer, num_elements, reduce_tree)
from gradax.distributed.local_sgd import (Sync, local_update, tree_sub)


def default_outer_optimizer(learning_rate: float = 0.7,
                            momentum: float = 0.9) -> optax.GradientTransformation:
  """Outer SGD with Nesterov momentum (DiLoCo's default: lr 0.7, momentum 0.9)."""
  return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def outer_sync(outer: optax.GradientTransformation, reducer: Any = "mean",
               axis_name: str = "data") -> Sync:
  """The DiLoCo sync: reduce the pseudo-gradients, one outer step, reset.

  Args:
    outer: the outer optax optimizer, applied to Δ̄ as if it were a gradient.
    reducer: ``"mean"``, a compressor or a ``Reducer`` for Δ_m.
    axis_name: the replica axis.

  Returns:
    A :class:`~gradax.distributed.local_sgd.Sync` whose replicated state is
    ``(global_params, outer_state)``.
  """
  red = as_reducer(reducer)
  if red is None:
    raise ValueError("reducer=None is not allowed for DiLoCo's outer sync.")

  def init(params):
    return params, outer.init(params)

  def init_replica(params):
    return red.init(jnp.zeros((num_elements(params),), jnp.float32),
                    axis_name)

  def sync(params, inner_state, s, r, step):
    del step
    global_params, outer_state = s
    delta = tree_sub(global_params, params)
    delta, r = reduce_tree(red, delta, r, axis_name)
    upd, outer_state = outer.update(delta, outer_state, global_params)
    global_params = optax.apply_updates(global_params, upd)
    return global_params, inner_state, (global_params, outer_state), r

  return Sync(init, init_replica, sync, lambda s, r: s[0], red.nbytes)


def diloco(
    loss_fn: Callable[[Any, Any], jax.Array],
    inner_optimizer: optax.GradientTransformation,
    mesh: Mesh,
    sync_every: int = 500,
    *,
    outer_optimizer: optax.GradientTransformation | None = None,
    compressor: Any = None,
    axis_name: str = "data",
    microbatches: int = 1,
) -> TrainAlgorithm:
  """DiLoCo: H inner steps per replica, then an outer step on Δ̄.

  Update, per round: θ_m ← InnerOpt^H(θ_global) on replica m;
  Δ̄ = mean_m C(θ_global − θ_m); θ_global ← θ_global + OuterOpt(Δ̄).
  With H = 1, inner SGD(η) and outer SGD(1) this is data-parallel SGD(η).

  Paper: Douillard et al., "DiLoCo: Distributed Low-Communication Training of
  Language Models", 2023, arXiv 2311.08105.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    inner_optimizer: any optax optimizer (AdamW in the paper); per replica.
    mesh: mesh with the replica axis ``axis_name``.
    sync_every: H >= 1 inner steps per round (500 in the paper, 100 in
      INTELLECT-1).
    outer_optimizer: defaults to SGD(0.7, Nesterov momentum 0.9).
    compressor: optional compressor for the pseudo-gradient (e.g. int8); it
      goes through ``compressed_pmean``. ``None`` sends f32.
    axis_name: the replica axis.
    microbatches: micro-batches per inner step.

  Returns:
    A ``TrainAlgorithm`` named ``"diloco"``; ``round`` runs a whole round.

  Example:
    >>> alg = diloco(loss, optax.adamw(1e-3), make_mesh("data=8"), 100,
    ...              compressor=int8_compressor)
    >>> state = alg.init(params); state, m = alg.round(state, h_batches)
  """
  outer = default_outer_optimizer() if outer_optimizer is None else (
      outer_optimizer)
  reducer = "mean" if compressor is None else compressor
  return local_update(
      "diloco", loss_fn, inner_optimizer, mesh,
      outer_sync(outer, reducer, axis_name), sync_every,
      axis_name=axis_name, microbatches=microbatches)
