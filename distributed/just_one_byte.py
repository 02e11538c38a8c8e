"""Just One Byte: shared-seed zeroth-order (SPSA) training, one byte per step.

Per step t, replica i draws z_i = N(0, I) from a key shared by everyone and
folded with (t, i), measures on its own batch

    p_i = (L(θ + εz_i) − L(θ − εz_i)) / (2ε),

quantises it to one signed byte q_i = clip(round(p_i/s), −127, 127) with
s = clip/127, and all-gathers the bytes. Every replica regenerates every z_j
from the shared key and applies the same update

    θ ← θ − lr · (1/n) Σ_j s·q_j · z_j ,

so all replicas stay bit-identical without exchanging any vector: each device
sends one byte per step. No backward pass is needed (MeZO-style memory).

Paper: decentralised MeZO/SPSA with single-byte projected gradients
(ALGORITHMS.md §3.9; Malladi et al., "Fine-Tuning Language Models with Just
Forward Passes", 2023, arXiv 2305.17333 for MeZO).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gradax.distributed.data_parallel import (
    TrainAlgorithm, cached_builder, num_elements, one_replica, place_batch)
from gradax.distributed import sharding as sh


class JustOneByteState(NamedTuple):
  """State of :func:`just_one_byte`.

  Attributes:
    params: per-replica parameters (leading replica axis; every replica holds
      its own copy, which stays bit-identical to the others).
    key: the shared PRNG key data (uint32).
    step: int32 step counter.
  """
  params: Any
  key: jax.Array
  step: jax.Array


def just_one_byte(
    loss_fn: Callable[[Any, Any], jax.Array],
    learning_rate: float,
    mesh: Mesh,
    *,
    eps: float = 1e-3,
    clip: float = 1.0,
    seed: int = 0,
    axis_name: str = "data",
) -> TrainAlgorithm:
  """Builds Just-One-Byte SPSA training on ``mesh``.

  Update: θ ← θ − lr·(1/n) Σ_j Q(p_j)·z_j with p_j the SPSA projection of
  replica j and Q the one-byte quantiser of step clip/127 (see module doc).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    learning_rate: lr > 0.
    mesh: mesh with axis ``axis_name``.
    eps: SPSA perturbation size ε > 0.
    clip: largest representable |p|; quantisation step clip/127 (> 0).
    seed: the shared seed.
    axis_name: the replica axis.

  Returns:
    A ``TrainAlgorithm`` named ``"just_one_byte"``; ``bytes_per_step`` is the
    all-gather of one uint8 per device, (n − 1) bytes.

  Example:
    >>> alg = just_one_byte(loss, 1e-3, make_mesh("data=8"))
    >>> state = alg.init(params); state, m = alg.step(state, batch)
  """
  for name, v in (("learning_rate", learning_rate), ("eps", eps),
                  ("clip", clip)):
    if not v > 0:
      raise ValueError(f"{name}={v!r}; must be > 0.")
  n = sh.axis_size(mesh, axis_name)
  scale = clip / 127.0

  def build(params):
    _, unravel = ravel_pytree(
        jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params))
    d = num_elements(params)

    def direction(key, step, j):
      k = jax.random.fold_in(jax.random.fold_in(key, step), j)
      return jax.random.normal(k, (d,), jnp.float32)

    def shard_step(state, batch):
      params = sh.local_view(state.params)
      key = jax.random.wrap_key_data(state.key)
      flat, _ = ravel_pytree(params)
      i = lax.axis_index(axis_name)
      z = direction(key, state.step, i)
      lp = loss_fn(unravel(flat + eps * z), batch)
      lm = loss_fn(unravel(flat - eps * z), batch)
      p = (lp - lm) / (2 * eps)
      q = jnp.clip(jnp.round(p / scale), -127, 127).astype(jnp.int8)
      byte = lax.bitcast_convert_type(q, jnp.uint8)
      allb = lax.all_gather(byte[None], axis_name, tiled=True)   # (n,) uint8
      pq = lax.bitcast_convert_type(allb, jnp.int8).astype(jnp.float32) * scale

      def acc(j, u):
        return u + pq[j] * direction(key, state.step, j)

      u = lax.fori_loop(0, n, acc, jnp.zeros((d,), jnp.float32))
      new = flat - (learning_rate / n) * u
      loss = 0.5 * (lp + lm)
      new_params = jax.tree.map(lambda a, b: a.astype(b.dtype), unravel(new),
                                params)
      return JustOneByteState(sh.replica_view(new_params), state.key,
                              state.step + 1), loss[None]

    specs = JustOneByteState(sh.replica_specs(params, axis_name), P(), P())

    def step(state, batch):
      f = jax.shard_map(
          shard_step, mesh=mesh,
          in_specs=(specs, jax.tree.map(lambda _: P(axis_name), batch)),
          out_specs=(specs, P(axis_name)), check_vma=False)
      return f(state, batch)

    return specs, jax.jit(step)

  get = cached_builder(build)

  def one(state):
    return one_replica(state.params)

  def init(params):
    params = jax.tree.map(jnp.asarray, params)
    specs, _ = get(params)
    state = JustOneByteState(
        sh.stack_replicas(params, n),
        jax.random.key_data(jax.random.key(seed)), jnp.zeros((), jnp.int32))
    return sh.place(state, mesh, specs, axis_name)

  def step(state, batch):
    _, jitted = get(one(state))
    state, losses = jitted(state, place_batch(batch, mesh, axis_name))
    return state, {"loss": np.float32(np.mean(sh.to_host(losses)))}

  def eval_params(state):
    return sh.replica(state.params, 0)

  step.jitted = lambda state: get(one(state))[1]
  return TrainAlgorithm("just_one_byte", init, step, eval_params,
                           lambda params: float(n - 1), mesh, axis_name)
