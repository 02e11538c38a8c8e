"""Accelerated optimizers vs AdamW: step time and final eval loss at equal steps.

For each task (`char_lm`, `digits_mlp`) every optimizer trains from the same
init on the same batches for the same number of steps; the table reports the
median jitted step time and the final eval loss, each also as a ratio to
AdamW's measured in the same run. LAWA is evaluated at its averaged params;
multi-momentum uses the digit labels as clusters on `digits_mlp` (one cluster
on `char_lm`); OASIS gets `obj_fn` (the batch loss) every step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax

from gradax import optimizers as gx
from gradax.experiments import benchlib
from gradax.experiments import tasks as tasks_lib

TITLE = "Accelerated optimizers vs AdamW: step time and final eval loss"

# AdamW's tuned rates from experiments/configs/default.py; Grams, Optimistic
# AMSGrad and LAWA reuse them (same scale as Adam), the SGD-type ones use 0.1.
_LR = {"char_lm": 3e-3, "digits_mlp": 3e-3}


def _optimizers(task: str, steps: int) -> dict[str, tuple[Callable[[], Any], str]]:
  lr = _LR[task]
  every = max(1, steps // 10)
  clusters = 10 if task == "digits_mlp" else 1
  return {
      "adamw": (lambda: optax.adamw(lr), "plain"),
      "grams": (lambda: gx.grams(lr, weight_decay=1e-4), "plain"),
      "optimistic_amsgrad": (lambda: gx.optimistic_amsgrad(lr), "plain"),
      "lawa_adamw": (lambda: gx.lawa_adamw(lr, num_checkpoints=5,
                                           checkpoint_every=every), "lawa"),
      "multi_momentum": (lambda: gx.multi_momentum(
          0.1, num_clusters=clusters, momentum=0.9),
                         "clusters" if clusters > 1 else "plain"),
      "clipped_sgd": (lambda: gx.clipped_sgd(0.1, clip_threshold=1.0,
                                             momentum=0.9), "plain"),
      "oasis": (lambda: gx.oasis(1.0, init_step_size=1e-2, alpha=1e-2),
                "obj_fn"),
  }


def _make_step(task, tx, kind: str, num_clusters: int):
  def step(params, state, batch):
    if kind == "clusters":
      cg, counts = gx.per_cluster_grads(task.loss, params, batch, batch["y"],
                                        num_clusters)
      loss, grads = jax.value_and_grad(task.loss)(params, batch)
      u, state = tx.update(grads, state, params, cluster_grads=cg,
                           cluster_mask=counts)
    else:
      loss, grads = jax.value_and_grad(task.loss)(params, batch)
      extra = {"obj_fn": lambda p: task.loss(p, batch)} if kind == "obj_fn" else {}
      u, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, u), state, loss

  return jax.jit(step)


def _train(task, factory, kind, steps, batch_size, seed):
  """Trains one optimizer; returns eval loss, headline and a timing closure."""
  tx = factory()
  params = task.init(jax.random.key(seed))
  state = tx.init(params)
  step = _make_step(task, tx, kind, 10)
  for t in range(steps):
    params, state, _ = step(params, state,
                            task.train_batch(t, batch_size, seed))
  eval_params = gx.lawa_eval_params(state, params) if kind == "lawa" else params
  metrics = jax.device_get(jax.jit(task.metrics)(eval_params, task.eval_batch()))
  batch = task.train_batch(0, batch_size, seed)
  benchlib.block(step(params, state, batch))  # compiled and warm
  timed = lambda: benchlib.median_time(step, params, state, batch, warmup=0,
                                       repeats=1)
  return float(metrics["loss"]), float(metrics[task.headline_metric]), timed


def _interleaved_times(timers: dict[str, Callable[[], float]],
                       rounds: int) -> dict[str, float]:
  """Median step time per optimizer, timing them in alternation.

  Alternating rounds expose every optimizer to the same load drift, so the
  ratios to AdamW are steadier than with back-to-back medians.
  """
  samples = {name: [] for name in timers}
  for _ in range(rounds):
    for name, timed in timers.items():
      samples[name].append(timed())
  return {name: float(np.median(v)) for name, v in samples.items()}


def run(quick: bool = False) -> list[dict]:
  """Trains every optimizer on char_lm and digits_mlp; one row per pair.

  Args:
    quick: a smoke run of a few seconds: digits_mlp with 16 hidden units,
      3 steps, AdamW, LAWA and OASIS only.

  Returns:
    Rows with task, optimizer, step time (ms and ratio to AdamW), final eval
    loss (and ratio to AdamW) and the task's headline metric.
  """
  steps = 3 if quick else 300
  batch_size = 8 if quick else 32
  if quick:  # a smoke run: one tiny task, the three code paths
    tasks = {"digits_mlp": tasks_lib.get_task("digits_mlp", hidden=16)}
    names = ["adamw", "lawa_adamw", "oasis"]
  else:
    tasks = {name: tasks_lib.get_task(name) for name in ("char_lm",
                                                          "digits_mlp")}
    names = None
  rows = []
  for task_name, task in tasks.items():
    results, timers = {}, {}
    for name, (factory, kind) in _optimizers(task_name, steps).items():
      if names is not None and name not in names:
        continue
      loss, headline, timers[name] = _train(task, factory, kind, steps,
                                            batch_size, 0)
      results[name] = (loss, headline)
    times = _interleaved_times(timers, rounds=3 if quick else 21)
    base_loss, base_time = results["adamw"][0], times["adamw"]
    for name, (loss, headline) in results.items():
      seconds = times[name]
      rows.append({
          "task": task_name,
          "optimizer": name,
          "steps": steps,
          "step_ms": 1e3 * seconds,
          "step_time_vs_adamw": seconds / base_time,
          "eval_loss": loss,
          "eval_loss_vs_adamw": loss / base_loss if np.isfinite(loss) else
                                float("nan"),
          "headline": task.headline_metric,
          "headline_value": headline,
      })
  return rows
