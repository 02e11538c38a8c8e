"""DiLoCo with eager updates: overlap the outer all-reduce with a whole round.

The all-reduce of round t's pseudo-gradients completes only during round
t + 1, so replica m cannot use Δ̄^(t) at the end of round t. The naive
one-step-delayed outer step uses Δ̄^(t−1) and hurts convergence; the eager
rule replaces its own stale contribution with its fresh one:

    Δ̃_m^(t) = Δ̄^(t−1) + (Δ_m^(t) − Δ_m^(t−1)) / M ,
    θ_global,m ← θ_global,m + OuterOpt_m(Δ̃_m^(t)),   θ_m ← θ_global,m ,

i.e. (1/M)·Δ_m^(t) + (1/M)·Σ_{k≠m} Δ_k^(t−1). Each replica keeps its own
outer parameters and outer-optimizer state (they differ by the eager local
terms), plus Δ_m^(t−1) and Δ̄^(t−1); Δ̄^(−1) = Δ_m^(−1) = 0.
``eval_params`` returns the mean of the replicas' outer parameters.

Paper: Kale, Douillard, Donchev, "Eager Updates For Overlapped Communication
and Computation in DiLoCo", 2025, arXiv 2502.12996 (formula as in
ALGORITHMS.md §3.4; no public code).
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
from gradax.distributed import sharding as sh
from gradax.distributed.local_sgd import Sync, local_update


def eager_diloco(
    loss_fn: Callable[[Any, Any], jax.Array],
    inner_optimizer: optax.GradientTransformation,
    mesh: Mesh,
    sync_every: int = 100,
    *,
    outer_optimizer: optax.GradientTransformation | None = None,
    compressor: Any = None,
    axis_name: str = "data",
    microbatches: int = 1,
) -> TrainAlgorithm:
  """DiLoCo with eager (one-round-overlapped) outer updates.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    inner_optimizer: any optax optimizer (per replica).
    mesh: mesh with the replica axis.
    sync_every: H >= 1.
    outer_optimizer: default SGD(0.7, Nesterov 0.9), one state per replica.
    compressor: optional compressor for the pseudo-gradients.
    axis_name: the replica axis.
    microbatches: micro-batches per inner step.

  Returns:
    A ``TrainAlgorithm`` named ``"eager_diloco"``.

  Example:
    >>> alg = eager_diloco(loss, optax.adamw(1e-3), make_mesh("data=8"), 50)
    >>> state = alg.init(params)
    >>> state, m = alg.round(state, batches)
  """
  outer = default_outer_optimizer() if outer_optimizer is None else (
      outer_optimizer)
  red = as_reducer("mean" if compressor is None else compressor)

  def init(params):
    return ()

  def init_replica(params):
    d = num_elements(params)
    z = jnp.zeros((d,), jnp.float32)
    return (params, outer.init(params), z, z,
            red.init(z, axis_name))

  def sync(params, inner_state, s, r, step):
    del step
    global_params, ostate, prev_local, prev_mean, rstate = r
    g = ravel_pytree(global_params)[0].astype(jnp.float32)
    flat, unravel = ravel_pytree(params)
    local = g - flat.astype(jnp.float32)
    # Started now, used next round (the overlapped all-reduce).
    mean, rstate = red.reduce(local, rstate, axis_name)
    n = lax.axis_size(axis_name)
    eager = prev_mean + (local - prev_local) / n
    eager_tree = jax.tree.map(lambda u, p: u.astype(p.dtype),
                              unravel(eager.astype(flat.dtype)), params)
    upd, ostate = outer.update(eager_tree, ostate, global_params)
    global_params = optax.apply_updates(global_params, upd)
    return global_params, inner_state, s, (global_params, ostate, local,
                                           mean, rstate)

  def eval_params(s, r):
    return jax.tree.map(lambda x: np.mean(x, axis=0), sh.to_host(r[0]))

  return local_update(
      "eager_diloco", loss_fn, inner_optimizer, mesh,
      Sync(init, init_replica, sync, eval_params, red.nbytes), sync_every,
      axis_name=axis_name, microbatches=microbatches)
