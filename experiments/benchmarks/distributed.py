"""Distributed training: bytes per step vs f32 data parallel, eval loss, DBW.

Rows, all measured in one run on 8 replicas (8 fake CPU devices; the module
re-runs itself in a subprocess with 8 CPU devices if the current process has
fewer):

``quick=True`` swaps char_lm for a 256-d noisy quadratic and shortens runs.

1. bytes per training step per device (ring model, from the compiled HLO via
   ``comm_bytes``) of f32 data-parallel AdamW, DiLoCo H=100 with an int8
   pseudo-gradient, and DeMo, each as a ratio to data parallel. DiLoCo's
   bytes per step are one compiled round (H inner steps + one two-phase int8
   reduction) divided by H; its int8 has one f32 scale per two-phase chunk
   (d/n elements), so the ratio is H·4 less that scale overhead. DeMo sends,
   per chunk (64x64 blocks), the top-16 DCT coefficients as bf16 values and
   uint16 indices (uint8 for 1-D chunks of 64, which keep the same density,
   ``proportional_k``), over an ``all_gather``: each device receives n − 1
   payloads, so the wire ratio is the payload ratio times 2/n. A second row
   gives the payload each device offers against 4d (the measure behind the
   paper's "85x").
2. final eval loss on ``char_lm`` after ``LOSS_STEPS`` steps at matched
   tokens (the same global batches for every method): DiLoCo (inner AdamW,
   outer Nesterov 0.7/0.9, f32 pseudo-gradients) and DeMo (the same wire
   format as row 1) against data-parallel AdamW. Each method runs its best
   setting from the sweeps listed above ``DILOCO_LOSS``: constant and
   warmup + cosine learning rates were swept for all three; at 1200 steps
   data parallel and DeMo are best with cosine, DiLoCo with a constant
   rate.
3. simulated time-to-target of SGD on a noisy least-squares problem with 16
   workers whose step times are shifted-exponential with 10% x6 slowdowns:
   dynamic backup workers (DBW) against the best static number of backup
   workers.
"""

from __future__ import annotations

import numpy as np

from gradax.experiments import benchlib

TITLE = "Distributed training: bytes/step vs f32 DP, char_lm eval loss, DBW"

REPLICAS = 8

# DeMo's wire format, shared by the bytes and the loss rows.
DEMO_WIRE = {"topk": 16, "chunk": 64, "value_dtype": "bf16",
             "proportional_k": True}
# char_lm eval loss sweeps, global batch 64 (8 per replica), same batches for
# every method. "cos" = linear warmup over the first 5% of steps, then cosine
# decay to 10% of the peak (optax.warmup_cosine_decay_schedule); otherwise a
# constant rate. Final eval loss (seconds per run, on a shared 2-core machine
# under load 3-17, so only rough):
# 400 steps:
#   data-parallel AdamW lr: 3e-3 1.7225 (35 s), 6e-3 1.6916, 1e-2 1.6802;
#     cos 3e-3 1.8913, cos 6e-3 1.7676, cos 1e-2 1.6723 (best), cos 2e-2
#     1.6937
#   DiLoCo (H, inner lr): (20, 3e-3) 2.032 (69 s), (10, 1e-3) 2.107,
#     (10, 3e-3) 2.077, (10, 5e-4) 2.191, (10, 6e-3) 2.175, (5, 3e-3) 2.257,
#     (40, 3e-3) 2.033, (20, 1e-2) 2.220, (20, cos 3e-3) 2.170,
#     (20, cos 6e-3) 2.170; at (20, 3e-3) outer lr 1.0 2.152, outer lr 0.5
#     2.020 (0.6% better than the paper's 0.7, which is kept). Smaller H
#     (more outer steps of Nesterov 0.7/0.9) is worse, not better.
#   DeMo lr, top-32 f32 values (the reference wire): 3e-3 1.834
#   DeMo lr, DEMO_WIRE (top-16 bf16): 1e-3 2.113, 2e-3 1.964, 3e-3 1.916
#     (126 s), 4e-3 1.912, 6e-3 1.922, cos 3e-3 2.019, cos 6e-3 1.957
#   Best against best: DiLoCo 2.032 / 1.6723 = 1.22x (outer lr 0.5: 1.21x),
#     DeMo 1.912 / 1.6723 = 1.14x.
# 1200 steps (3x the tokens; every gap narrows with length, the 400-step
# gap is largely an undertrained model and DiLoCo's 20 outer steps). Seconds
# per run at load ~7: DP 79 s, DiLoCo 63-74 s, DeMo 131 s, about 5 min for
# the section (2-4x that at load 15):
#   data-parallel AdamW: 6e-3 1.5772, 1e-2 1.5777; cos 1e-2 1.5133 (best)
#   DiLoCo (H, inner lr), outer 0.7/0.9: (20, 1e-3) 1.6870, (20, 2e-3)
#     1.6397 (best), (20, 3e-3) 1.6449, (10, 2e-3) 1.6404, (40, 2e-3)
#     1.6689, (20, cos 3e-3) 1.7185, (20, cos 6e-3) 1.6884 (cosine hurts
#     DiLoCo at both lengths); at (20, 3e-3) outer lr 0.5 1.6393 (0.3%
#     better than the paper's 0.7, which is kept)
#   DeMo DEMO_WIRE: 3e-3 1.6547, cos 4e-3 1.6039, cos 6e-3 1.6026 (best),
#     cos 1e-2 1.6182
#   Best against best (the benchmark's setting): DiLoCo 1.6397 / 1.5133 =
#     1.084x, DeMo 1.6026 / 1.5133 = 1.059x. Within the constant-rate family
#     only: DiLoCo 1.6397 / 1.5772 = 1.040x, DeMo 1.6547 / 1.5772 = 1.049x.
#     Neither reaches 1.03x.
LOSS_STEPS = 1200
DP_LOSS = {"learning_rate": 1e-2, "schedule": "cosine"}
DILOCO_LOSS = {"sync_every": 20, "learning_rate": 2e-3,
               "schedule": "constant"}
DEMO_LOSS = {"learning_rate": 6e-3, "schedule": "cosine"}


def _learning_rate(setting, steps):
  """A float, or warmup (5% of steps) + cosine decay to 10% of the peak."""
  import optax  # pylint: disable=g-import-not-at-top

  peak = setting["learning_rate"]
  if setting["schedule"] == "constant":
    return peak
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, max(1, steps // 20), steps, end_value=peak * 0.1)


def _bytes_rows(task, params, mesh, quick):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from gradax import distributed as gd  # pylint: disable=g-import-not-at-top
  from gradax.distributed.data_parallel import place_batch  # pylint: disable=g-import-not-at-top

  H = 100
  batch = task.train_batch(0, 2 * REPLICAS, 0)
  dp = gd.data_parallel(task.loss, optax.adamw(1e-3), mesh)
  s = dp.init(params)
  dp_bytes = gd.comm_bytes(dp.step.jitted(s), s,
                           place_batch(batch, mesh)).wire_bytes

  d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  # One f32 scale per two-phase chunk (each device quantises d/n elements).
  dl = gd.diloco(task.loss, optax.adamw(1e-3), mesh, H,
                 compressor=gd.int8(block_size=-(-d // REPLICAS)))
  s = dl.init(params)
  stacked = jax.tree.map(lambda x: np.broadcast_to(x, (H,) + x.shape), batch)
  dl_bytes = gd.comm_bytes(dl.round.jitted(s), s,
                           dl.round.place(stacked)).wire_bytes / H

  de = gd.demo(task.loss, 1e-3, mesh, **DEMO_WIRE)
  s = de.init(params)
  cb = gd.comm_bytes(de.step.jitted(s), s, place_batch(batch, mesh))
  de_bytes = cb.wire_bytes
  de_offered = sum(c.operand_bytes for c in cb.compiled
                   if c.op == "all-gather")
  demo_name = f"demo_top{DEMO_WIRE['topk']}_chunk{DEMO_WIRE['chunk']}_bf16"
  rows = []
  for method, value, base, target in (
      ("diloco_H100_int8 (one scale per chunk)", dl_bytes, dp_bytes, 400.0),
      (f"{demo_name} (wire)", de_bytes, dp_bytes, 50.0),
      (f"{demo_name} (payload offered)", de_offered, 4.0 * d, 50.0)):
    ratio = base / value
    rows.append({"section": "bytes/step vs f32 DP", "method": method,
                 "value": float(value), "dp_value": float(base),
                 "ratio": float(ratio), "target": f">= {target:g}x",
                 "met": bool(ratio >= target)})
  return rows


def _loss_rows(task, params, mesh, quick):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from gradax import distributed as gd  # pylint: disable=g-import-not-at-top

  steps = 8 if quick else LOSS_STEPS
  H = 4 if quick else DILOCO_LOSS["sync_every"]
  batch_size = 4 * REPLICAS if quick else 8 * REPLICAS
  batches = [task.train_batch(t, batch_size, 0) for t in range(steps)]
  eval_fn = jax.jit(lambda p: task.metrics(p, task.eval_batch())["loss"])

  def train(alg):
    s = alg.init(params)
    if alg.round is not None and alg.period > 1:
      for r in range(steps // alg.period):
        chunk = batches[r * alg.period:(r + 1) * alg.period]
        s, _ = alg.round(s, jax.tree.map(lambda *x: np.stack(x), *chunk))
    else:
      for b in batches:
        s, _ = alg.step(s, b)
        jax.block_until_ready(s)   # one collective program in flight (CPU)
    return float(eval_fn(alg.eval_params(s)))

  def name(setting):
    lr = setting["learning_rate"]
    return f"lr{lr:g}" if setting["schedule"] == "constant" else (
        f"{setting['schedule']}_lr{lr:g}")

  lr = lambda setting: _learning_rate(setting, steps)
  dp_loss = train(gd.data_parallel(task.loss, optax.adamw(lr(DP_LOSS)), mesh))
  rows = []
  for method, alg in (
      (f"diloco_H{H}_adamw_{name(DILOCO_LOSS)}",
       gd.diloco(task.loss, optax.adamw(lr(DILOCO_LOSS)), mesh, H)),
      (f"demo_top{DEMO_WIRE['topk']}_bf16_{name(DEMO_LOSS)}",
       gd.demo(task.loss, lr(DEMO_LOSS), mesh, compression_decay=0.999,
               **DEMO_WIRE))):
    loss = train(alg)
    ratio = loss / dp_loss
    rows.append({"section": f"{task.name} eval loss, {steps} steps x "
                            f"{batch_size} examples, vs data-parallel AdamW "
                            f"{name(DP_LOSS)}", "method": method,
                 "value": loss, "dp_value": dp_loss, "ratio": ratio,
                 "target": "<= 1.03", "met": bool(ratio <= 1.03)})
  return rows


def _dbw_rows(quick):
  from gradax.distributed import stragglers as st  # pylint: disable=g-import-not-at-top

  n, dim, lr, noise = 16, 32, 0.05, 2.0
  rng = np.random.default_rng(0)
  h = np.logspace(0, 1, dim)
  x0 = rng.normal(size=dim) * 3
  max_iters = 300 if quick else 3000
  loss = lambda x: 0.5 * float(np.sum(h * x * x))
  target = (1e-2 if quick else 1e-3) * loss(x0)
  seeds = range(1) if quick else range(5)

  def simulate(tm, choose, observe=None):
    x, clock = x0.copy(), 0.0
    grng = np.random.default_rng(1000 + tm.seed)
    for t in range(max_iters):
      times = tm.sample(t)
      w, wait = st.fastest(times, choose())
      g = (h * x + noise * grng.normal(size=(n, dim)))[w > 0]
      if observe is not None:
        observe(times, g, x)
      x = x - lr * g.mean(axis=0)
      clock += wait
      if loss(x) <= target:
        return clock
    return float("inf")

  static = {k: [] for k in range(1, n + 1)}
  dbw_times = []
  for seed in seeds:
    tm = st.TimeModel(n, "shifted_exponential", base=1.0, scale=0.3,
                      slow_prob=0.1, slow_factor=6.0, seed=seed)
    for k in static:
      static[k].append(simulate(tm, lambda k=k: k))
    dbw = st.DynamicBackupWorkers(n, learning_rate=lr)
    dbw_times.append(simulate(tm, dbw.choose, dbw.observe))
  static = {k: float(np.mean(v)) for k, v in static.items()}
  best_k = min(static, key=static.get)
  dbw_time = float(np.mean(dbw_times))
  section = f"simulated time-to-target, 16 workers, mean of {len(seeds)} seeds"
  return [{"section": section,
           "method": f"DBW vs best static (k={best_k}, b={n - best_k})",
           "value": dbw_time, "dp_value": static[best_k],
           "ratio": static[best_k] / dbw_time,
           "target": "DBW <= best static",
           "met": bool(dbw_time <= static[best_k])},
          {"section": section, "method": "DBW vs waiting for all (b=0)",
           "value": dbw_time, "dp_value": static[n],
           "ratio": static[n] / dbw_time, "target": "-",
           "met": bool(dbw_time <= static[n])}]


def _run_here(quick: bool) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from gradax import distributed as gd  # pylint: disable=g-import-not-at-top
  from gradax.experiments import tasks  # pylint: disable=g-import-not-at-top

  if quick:   # a smoke run: the same code paths on a tiny problem
    task = tasks.get_task("quadratic", dim=256, noise=0.1)
  else:
    task = tasks.get_task("char_lm")
  params = task.init(jax.random.key(0))
  mesh = gd.make_mesh(f"data={REPLICAS}",
                      devices=jax.devices("cpu")[:REPLICAS])
  return (_bytes_rows(task, params, mesh, quick)
          + _loss_rows(task, params, mesh, quick) + _dbw_rows(quick))


def run(quick: bool = False) -> list[dict]:
  """Runs the benchmark (in a subprocess when fewer than 8 CPU devices)."""
  return benchlib.run_on_cpu_devices(__name__, quick, REPLICAS)
