"""Runner step-time overhead against a hand-written jit loop on the same task.

Both sides train the same task with the same optimizer, batches and shardings
(params replicated, batch sharded over ``data`` on all devices). The hand loop
is the minimal jitted step plus ``device_put`` of each batch; the runner is
``run_experiment`` with eval and checkpoints off and its default logging. Step
time is the median over windows of ``log_every`` steps after compilation.
Target: runner overhead <= 5%.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gradax.distributed import make_mesh
from gradax.experiments import run as runner
from gradax.experiments import tasks

TITLE = "Runner step-time overhead vs a hand-written jit loop (target <= 5%)"
TARGET = 0.05


def _hand_loop_step_time(task, lr, batch_size, window, windows, mesh):
  tx = optax.adamw(lr)
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  params = jax.device_put(task.init(jax.random.key(0)), repl)
  state = jax.device_put(tx.init(params), repl)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  times, i = [], 0
  for w in range(windows + 1):
    start = time.perf_counter()
    for _ in range(window):
      batch = jax.device_put(task.train_batch(i, batch_size, 0), data)
      params, state, loss = step(params, state, batch)
      i += 1
    float(loss)
    if w:  # window 0 compiles
      times.append((time.perf_counter() - start) / window)
  return statistics.median(times)


def _runner_step_time(task_name, batch_size, window, windows):
  with tempfile.TemporaryDirectory() as workdir:
    runner.run_experiment(dict(
        task=task_name, optimizers="adamw", steps=window * (windows + 1),
        batch_size=batch_size, mesh="data=-1", log_every=window, eval_every=0,
        checkpoint_every=0, progress=False, workdir=workdir))
    import json, os  # pylint: disable=g-import-not-at-top,multiple-imports
    with open(os.path.join(workdir, "adamw", "metrics.jsonl")) as f:
      rates = [json.loads(line)["steps_per_sec"] for line in f]
  return statistics.median(1.0 / r for r in rates[1:])


def run(quick: bool = False) -> list[dict]:
  task_name = "digits_mlp" if quick else "char_lm"
  window, windows = (5, 2) if quick else (20, 5)
  batch_size = 8 * jax.device_count() if quick else 32
  task = tasks.get_task(task_name)
  lr = runner.resolve_learning_rate(runner.default_config(), "adamw", task_name, {})[0]
  mesh = make_mesh("data=-1", axis_type=jax.sharding.AxisType.Auto)
  hand = _hand_loop_step_time(task, lr, batch_size, window, windows, mesh)
  ran = _runner_step_time(task_name, batch_size, window, windows)
  hand2 = _hand_loop_step_time(task, lr, batch_size, window, windows, mesh)
  hand = min(hand, hand2)  # bracket the runner; the faster hand loop is the reference
  overhead = ran / hand - 1.0
  return [{
      "task": task_name, "devices": jax.device_count(), "batch": batch_size,
      "hand_ms_per_step": 1e3 * hand, "runner_ms_per_step": 1e3 * ran,
      "overhead": overhead, "target": f"<= {TARGET:.0%}", "met": overhead <= TARGET,
  }]
