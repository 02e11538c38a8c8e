"""MoE benchmarks: layer throughput vs a dense FFN, moe_lm vs char_lm, and the
bytes each expert-parallel strategy moves per token.

1. **Layer throughput** (forward, CPU): a dense FFN d -> 4d -> d against an
   MoE with the same *active* parameters (E = 8, k = 2, h = 2d), with
   dense-einsum (capacity-padded, CF 1.25), dropless sorted (``ragged_dot``)
   and the per-expert loop. FLOPs are analytic (ALGORITHMS.md §5.14; the
   einsum path also pays 4 E C d per token for its dispatch/combine masks,
   which dominates at large T), because
   ``cost_analysis`` over-counts ``ragged_dot`` on CPU, where it is lowered
   densely (§6.7): CPU timings of the sorted path are not representative of
   accelerators.
2. **moe_lm vs char_lm** at equal active parameters and steps (Adam 3e-3,
   batch 16): eval bpc. Target: the MoE reaches a lower eval loss.
3. **Bytes per token** moved by each EP strategy on an ``expert=8`` mesh,
   measured from the jaxpr and the compiled HLO
   (``gradax.distributed.comm_bytes``) next to the analytic model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradax.experiments import benchlib
from gradax.experiments.tasks import get_task
from gradax.moe import dispatch, expert_parallel, routing

TITLE = "Mixture of experts: layer throughput, moe_lm vs char_lm, EP bytes"

KEYS = ("section", "name", "value", "unit", "baseline", "ratio", "flops_per_token",
        "target", "met", "note")


def _row(**kw):
  return {k: kw.get(k) for k in KEYS}


def _layer_rows(quick):
  d, e, k = (32, 8, 2) if quick else (128, 8, 2)
  t = 256 if quick else 4096
  h_dense, h = 4 * d, 4 * d // k
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(d, h_dense)) / math.sqrt(d), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(h_dense, d)) / math.sqrt(h_dense), jnp.float32)
  wr = jnp.asarray(rng.normal(size=(d, e)) / math.sqrt(d), jnp.float32)
  p = {"wi": jnp.asarray(rng.normal(size=(e, d, h)) / math.sqrt(d), jnp.float32),
       "wo": jnp.asarray(rng.normal(size=(e, h, d)) / math.sqrt(h), jnp.float32)}
  cf = 1.25
  cap = math.ceil(cf * t * k / e)

  dense = jax.jit(lambda x: jax.nn.gelu(x @ w1) @ w2)

  def moe(name, capacity):
    def f(x):
      r = routing.top_k_routing(x @ wr, k)
      return dispatch.DISPATCHERS[name](x, r.expert_index, r.combine_weights, p,
                                        capacity=capacity)[0]
    return jax.jit(f)

  repeats = 3 if quick else 5
  t_dense = benchlib.median_time(dense, x, warmup=1, repeats=repeats)
  flops_dense = 2 * 2 * d * h_dense
  flops_router = 2 * d * e
  rows = [_row(section="layer", name="dense FFN (d->4d->d)", value=t / t_dense,
               unit="tokens/s", baseline=t / t_dense, ratio=1.0,
               flops_per_token=flops_dense, note=f"T={t}, d={d}")]
  variants = [
      # Padded experts plus the [T, E, C] dispatch and combine einsums.
      ("MoE einsum (CF 1.25)", "einsum", cap,
       flops_router + 2 * 2 * e * cap * d * h / t + 2 * 2 * e * cap * d),
      ("MoE sorted dropless (ragged_dot)", "sorted", None,
       flops_router + 2 * 2 * k * d * h),
      ("MoE per-expert loop", "loop", None,
       flops_router + 2 * 2 * e * d * h),
  ]
  for label, name, capacity, flops in variants:
    sec = benchlib.median_time(moe(name, capacity), x, warmup=1, repeats=repeats)
    note = f"E={e}, k={k}, h={h}; CPU, noisy"
    if name == "sorted":
      note += "; ragged_dot is lowered densely on XLA:CPU"
    rows.append(_row(section="layer", name=label, value=t / sec,
                     unit="tokens/s", baseline=t / t_dense,
                     ratio=t_dense / sec, flops_per_token=flops, note=note))
  return rows


def _train(task, steps, batch_size, seed=0):
  params = task.init(jax.random.key(seed))
  tx = optax.adam(3e-3)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(task.loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  curve = []
  eval_fn = jax.jit(task.metrics)
  every = max(1, steps // 10)
  for i in range(steps):
    params, state = step(params, state, task.train_batch(i, batch_size, seed))
    if (i + 1) % every == 0 or i + 1 == steps:
      curve.append((i + 1, float(eval_fn(params, task.eval_batch())["bpc"])))
  return curve


def lm_curves(steps, batch_size=16, **sizes):
  """Eval-bpc curves ``{name: [(step, bpc), ...]}`` of char_lm and moe_lm."""
  return {name: _train(get_task(name, **sizes), steps, batch_size)
          for name in ("char_lm", "moe_lm")}


def _lm_rows(quick):
  steps = 2 if quick else 300
  d = 16 if quick else 64
  sizes = {"seq_len": 16, "d_model": d, "num_layers": 1} if quick else {}
  curves = lm_curves(steps, **sizes)
  dense, moe = curves["char_lm"][-1][1], curves["moe_lm"][-1][1]
  active = 8 * d * d
  return [
      _row(section="lm", name="char_lm eval bpc", value=dense, unit="bpc",
           baseline=dense, ratio=1.0, flops_per_token=2 * active,
           note=f"{steps} steps, batch 16, adam 3e-3"),
      _row(section="lm", name="moe_lm eval bpc (E=8, k=2, dropless)",
           value=moe, unit="bpc", baseline=dense, ratio=moe / dense,
           flops_per_token=2 * active + 2 * d * 8,
           target="moe bpc < char_lm bpc", met=bool(moe < dense),
           note=f"equal active FFN params ({active}/layer), {steps} steps"),
  ]


def _ep_rows(quick):
  from gradax.distributed import make_mesh  # pylint: disable=g-import-not-at-top
  from gradax.distributed.comm_bytes import comm_bytes  # pylint: disable=g-import-not-at-top
  n = 8
  if jax.device_count() < n:
    return [_row(section="ep", name=s, unit="bytes/token",
                 note=f"skipped: needs {n} devices, have {jax.device_count()}")
            for s in expert_parallel.STRATEGIES]
  mesh = make_mesh(f"expert={n}")
  d, e, k, h = (16, 8, 2, 32) if quick else (64, 16, 2, 128)
  t = 8 * n if quick else 64 * n
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  wr = jnp.asarray(rng.normal(size=(d, e)), jnp.float32)
  p = {"wi": jnp.asarray(rng.normal(size=(e, d, h)), jnp.float32),
       "wo": jnp.asarray(rng.normal(size=(e, h, d)), jnp.float32)}
  xs, wrs, ps = expert_parallel.shard_inputs(mesh, x, wr, p)
  rows = []
  for strategy in expert_parallel.STRATEGIES:
    cf = 1.25 if strategy == "all_to_all" else None
    fn = jax.jit(lambda x, wr, p, s=strategy, cf=cf:
                 expert_parallel.expert_parallel_moe(
                     x, wr, p, mesh=mesh, k=k, strategy=s,
                     capacity_factor=cf)[0])
    cb = comm_bytes(fn, xs, wrs, ps)
    # Only the token-moving collectives (the aux-loss all-reduce is scalars).
    moved = sum(c.wire_bytes * c.count for c in cb.compiled
                if c.op != "all-reduce")
    model = expert_parallel.collective_bytes_per_token(
        strategy, num_tokens=t // n, d_model=d, num_experts=e, k=k,
        axis_size=n, capacity_factor=cf)
    measured = moved / (t // n)
    rows.append(_row(
        section="ep", name=f"{strategy}" + (" (CF 1.25)" if cf else
                                             " (dropless)"),
        value=measured, unit="bytes/token/device", baseline=model,
        ratio=measured / model, note=f"expert={n}, T_local={t // n}, d={d}, "
        f"E={e}, k={k}; baseline = analytic model, f32"))
  return rows


def run(quick: bool = False) -> list[dict]:
  return _layer_rows(quick) + _ep_rows(quick) + _lm_rows(quick)
