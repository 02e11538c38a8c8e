"""Machinery shared by 1-bit Adam, 0/1 Adam and 1-bit LAMB.

The three DeepSpeed optimizers (ALGORITHMS.md §1.3) share: validation of the
Adam hyperparameters, f32 moment buffers laid out like the params, the exact
f32 data-parallel mean of the warm-up stage, the moment EMAs, the 1-bit
two-phase all-reduce with worker error (server error lives in the
``compressed_pmean`` state), the per-device byte model, the frozen-variance
mask for coordinates whose gradient was always zero, and (1-bit LAMB) the
fusion of all momenta into one vector. Each lives here once.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradax.distributed import collectives as _col
from gradax.distributed import compressors as _comp
from gradax.optimizers._tree import check_range
from gradax.optimizers.error_feedback import pmean_init


def check_adam_args(b1, b2, eps, freeze_step, freeze_name="freeze_step"):
  """Validates b1, b2 in [0, 1), eps > 0 and an integer freeze step >= 0."""
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  check_range("eps", eps, 0.0, None, low_inclusive=False)
  if not isinstance(freeze_step, int) or isinstance(freeze_step, bool) or \
      freeze_step < 0:
    raise ValueError(f"{freeze_name} must be an integer >= 0; got "
                     f"{freeze_name}={freeze_step!r}.")


def onebit_bytes(params, n: int, compressed: bool,
                 compressor: _comp.Compressor | None = None) -> float:
  """Per-device ring-model bytes of one 1-bit Adam step on ``n`` replicas.

  Warm-up: an f32 all-reduce, 2(n-1)/n * 4d. Compression stage: per tensor,
  the two-phase 1-bit all-reduce sends 2(n-1) * (c/8 + 4) bytes, with chunk
  length c = ceil(d/n) rounded up to a multiple of 8.
  """
  comp = compressor or _comp.onebit()
  total = 0.0
  for leaf in jax.tree.leaves(params):
    d = max(1, math.prod(jnp.shape(leaf)))
    if n <= 1:
      continue
    if not compressed:
      total += 2 * (n - 1) / n * 4 * d
    else:
      c = _col._chunk_len(d, n, comp.chunk_multiple)  # pylint: disable=protected-access
      total += 2 * (n - 1) * comp.payload_nbytes((c,))
  return total


def zeros_f32(params):
  """f32 zeros shaped and sharded like each param."""
  return jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)


def to_f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def cast_like(tree, ref):
  return jax.tree.map(lambda x, r: x.astype(r.dtype), tree, ref)


def schedule_fn(learning_rate: optax.ScalarOrSchedule):
  """``count -> lr`` for a float or a schedule."""
  return learning_rate if callable(learning_rate) else (
      lambda _: learning_rate)


def data_mean(g, axis_name: str | None):
  """Exact f32 mean over the data axis (identity for one replica)."""
  if axis_name is None:
    return g
  return jax.tree.map(lambda x: lax.pmean(x, axis_name), g)


def ema(old, new, decay):
  """decay * old + (1 - decay) * new, leafwise."""
  return jax.tree.map(lambda a, x: decay * a + (1 - decay) * x, old, new)


def ema_sq(old, new, decay):
  """decay * old + (1 - decay) * new^2, leafwise."""
  return jax.tree.map(lambda a, x: decay * a + (1 - decay) * x * x, old, new)


def onebit_allreduce(x, worker_error, pstate, comp, axis_name):
  """DeepSpeed's compressed all-reduce of ``x`` with worker and server error.

  b = x + e_w;  mean = TwoPhase1Bit(b) (server error in ``pstate``);
  e_w <- b - C(b).

  Returns:
    ``(mean, worker_error, pstate)``.
  """
  b = jax.tree.map(jnp.add, x, worker_error)
  mean, local, pstate = _col.compressed_pmean(
      b, comp, axis_name, pstate, "two_phase", return_local=True)
  return mean, jax.tree.map(jnp.subtract, b, local), pstate


def live(nu):
  """Coordinates whose (frozen) variance is positive.

  A coordinate whose gradient was always zero has v = 0: the sign compressor
  cannot send a 0 there, and m / (sqrt(0) + eps) would blow the sign noise
  up by 1/eps. Its momentum and update are held at zero instead (DeepSpeed
  needs a user-supplied ``exp_avg_mask`` for this).
  """
  return jax.tree.map(lambda v: v > 0, nu)


def where_live(mask, tree):
  return jax.tree.map(lambda k, x: jnp.where(k, x, 0.0), mask, tree)


def fuse(tree):
  """All leaves, raveled and concatenated into one f32 vector.

  Leaves sharded over an explicit mesh axis are first replicated (flattening
  a sharded array has no implied sharding); inside ``shard_map`` nothing is
  sharded and this is a plain concatenation.
  """
  leaves = [jnp.ravel(_col.unshard(x)) for x in jax.tree.leaves(tree)]
  return jnp.concatenate(leaves).astype(jnp.float32)


def unfuse(flat, like):
  """Inverse of :func:`fuse`: leaves shaped and sharded like ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  out, off = [], 0
  for ref in leaves:
    d = math.prod(jnp.shape(ref))
    out.append(_col.shard_like(flat[off:off + d].reshape(jnp.shape(ref)), ref))
    off += d
  return treedef.unflatten(out)


def fused_size(params) -> int:
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))


def moments_state_init(params, comp, axis_name, fused: bool = False
                       ) -> dict[str, Any]:
  """The fields every 1-bit optimizer state starts with.

  ``mu``, ``nu``: f32 zeros like the params; ``worker_error`` and its
  ``pmean`` state per leaf, or over the fused vector when ``fused``;
  ``count`` and ``comm_bytes`` zero.
  """
  zeros = zeros_f32(params)
  err = jnp.zeros((fused_size(params),), jnp.float32) if fused else zeros
  return dict(count=jnp.zeros((), jnp.int32), mu=zeros, nu=zeros,
              worker_error=err,
              pmean=pmean_init(err, comp, axis_name, "two_phase"),
              comm_bytes=jnp.zeros((), jnp.float32))
