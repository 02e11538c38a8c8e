"""CO2: local updates with a one-round-stale, overlapped outer step.

Each round of τ local steps ends by *starting* an all-reduce of the local
parameters; it overlaps the next round, so the outer step of round t uses the
average θ̄^(t−1) of the previous round. With outer parameters θ_old, outer
momentum m, staleness-gap penalty λ and outer learning rate lr:

    m     ← β·m + (θ_old − θ̄^(t−1)) / λ
    m     ← clip(m, −c, c)                        (if clipping is enabled)
    θ_old ← θ_old − lr·m ,      every replica restarts from θ_m ← θ_old .

Defaults follow the reference (``weigao266/fairscale-CO2``, derived from
SlowMo): β = 0.5, lr = 1.0, λ = 1.0, clipping off with threshold 1.0. The
reference's ``_co2_clip`` calls ``torch.clamp`` without assigning the result,
so its clipping is a no-op; gradax clips for real (element-wise).
θ̄^(−1) is the initial parameters, so round 0 makes no outer move.

Paper: Sun et al., "CO2: Efficient Distributed Training with Full
Communication-Computation Overlap", ICLR 2024, arXiv 2401.16265.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gradax.distributed.data_parallel import (
    TrainAlgorithm, as_reducer, num_elements, reduce_tree)
from gradax.distributed.local_sgd import Sync, local_update


def co2(
    loss_fn: Callable[[Any, Any], jax.Array],
    inner_optimizer: optax.GradientTransformation,
    mesh: Mesh,
    sync_every: int = 8,
    *,
    outer_learning_rate: float = 1.0,
    outer_momentum: float = 0.5,
    gap_penalty: float = 1.0,
    clip_threshold: float | None = None,
    compressor: Any = None,
    axis_name: str = "data",
    microbatches: int = 1,
) -> TrainAlgorithm:
  """CO2 on ``mesh``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    inner_optimizer: any optax optimizer (per replica).
    mesh: mesh with the replica axis.
    sync_every: τ, local steps per round (>= 1).
    outer_learning_rate: lr > 0.
    outer_momentum: β in [0, 1).
    gap_penalty: λ > 0.
    clip_threshold: c > 0 to clip the outer momentum element-wise, or None.
    compressor: optional compressor for the parameter all-reduce.
    axis_name: the replica axis.
    microbatches: micro-batches per inner step.

  Returns:
    A ``TrainAlgorithm`` named ``"co2"``.

  Example:
    >>> alg = co2(loss, optax.adamw(1e-3), make_mesh("data=8"), 8)
    >>> state = alg.init(params)
    >>> state, m = alg.round(state, batches)
  """
  if not outer_learning_rate > 0:
    raise ValueError(
        f"outer_learning_rate={outer_learning_rate!r}; must be > 0.")
  if not 0.0 <= outer_momentum < 1.0:
    raise ValueError(f"outer_momentum={outer_momentum!r}; must be in [0, 1).")
  if not gap_penalty > 0:
    raise ValueError(f"gap_penalty={gap_penalty!r}; must be > 0.")
  if clip_threshold is not None and not clip_threshold > 0:
    raise ValueError(
        f"clip_threshold={clip_threshold!r}; must be > 0 or None.")
  red = as_reducer("mean" if compressor is None else compressor)

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return params, zeros, params   # θ_old, m, θ̄ pending (stale average)

  def init_replica(params):
    return red.init(jnp.zeros((num_elements(params),), jnp.float32),
                    axis_name)

  def sync(params, inner_state, s, r, step):
    del step
    old, m, stale = s
    m = jax.tree.map(
        lambda m_, o, a: outer_momentum * m_ + (o - a) / gap_penalty,
        m, old, stale)
    if clip_threshold is not None:
      m = jax.tree.map(lambda x: jnp.clip(x, -clip_threshold, clip_threshold),
                       m)
    old = jax.tree.map(lambda o, m_: o - outer_learning_rate * m_, old, m)
    # Started now, consumed next round.
    stale, r = reduce_tree(red, params, r, axis_name)
    return old, inner_state, (old, m, stale), r

  return local_update(
      "co2", loss_fn, inner_optimizer, mesh,
      Sync(init, init_replica, sync, lambda s, r: s[0], red.nbytes),
      sync_every, axis_name=axis_name, microbatches=microbatches)
