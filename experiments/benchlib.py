"""Timing helpers for benchmarks (``experiments/benchmarks/*.py``).

Benchmarks measure ratios side by side in one run; these helpers give each
side the same treatment: warm-up calls (compilation, caches), then the median
of several timed calls, each of which blocks until its outputs are ready.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax


def block(tree: Any) -> Any:
  """Waits until every array in ``tree`` is computed; returns ``tree``."""
  return jax.block_until_ready(tree)


def median_time(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 5) -> float:
  """Median wall time, in seconds, of ``fn(*args)`` including its device work.

  Args:
    fn: the callable to time (e.g. a jitted function). Its outputs are blocked on.
    *args: positional arguments passed on every call.
    warmup: untimed calls first (compilation and caches), >= 0.
    repeats: timed calls, >= 1; the median is returned.

  Returns:
    The median of ``repeats`` wall times in seconds.

  Raises:
    ValueError: if ``warmup`` < 0 or ``repeats`` < 1.

  Example:
    >>> f = jax.jit(lambda x: x @ x)
    >>> t = median_time(f, jnp.ones((256, 256)))
  """
  if warmup < 0:
    raise ValueError(f"warmup={warmup!r} is invalid; it must be >= 0.")
  if repeats < 1:
    raise ValueError(f"repeats={repeats!r} is invalid; it must be >= 1.")
  for _ in range(warmup):
    block(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def train_scan(loss_fn: Callable[..., Any], tx: Any) -> Callable[..., Any]:
  """A jitted ``lax.scan`` of optax training steps over stacked batches.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    tx: an optax ``GradientTransformation``.

  Returns:
    ``run(params, state, batches) -> ((params, state), losses)``, where
    ``batches`` has a leading step axis (see ``stack_batches``).

  Example:
    >>> run = train_scan(task.loss, optax.adamw(1e-3))
    >>> (params, state), losses = run(params, tx.init(params), batches)
  """
  def run(params, state, batches):
    def step(carry, batch):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p, batch)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    return jax.lax.scan(step, (params, state), batches)
  return jax.jit(run)


def stack_batches(batches: list[Any]) -> Any:
  """Stacks a list of batch pytrees along a new leading step axis (numpy)."""
  return jax.tree.map(lambda *x: np.stack(x), *batches)


def run_on_cpu_devices(module: str, quick: bool, devices: int) -> list[dict]:
  """Runs ``module._run_here(quick)`` where ``devices`` CPU devices exist.

  Multi-device benchmarks need a fixed number of (fake) CPU devices, which
  can only be set before JAX starts. When this process already has them the
  benchmark runs here; otherwise it runs in a fresh subprocess with
  ``--xla_force_host_platform_device_count`` and its rows come back as JSON.

  Args:
    module: dotted module name with a ``_run_here(quick) -> list[dict]``.
    quick: passed through to ``_run_here``.
    devices: CPU devices the benchmark needs, >= 1.

  Returns:
    The benchmark's rows.

  Example:
    >>> rows = run_on_cpu_devices(
    ...     "gradax.experiments.benchmarks.distributed", quick=True, devices=8)
  """
  if devices < 1:
    raise ValueError(f"devices={devices!r} is invalid; it must be >= 1.")
  try:
    enough = len(jax.devices("cpu")) >= devices
  except RuntimeError:
    enough = False
  if enough:
    return importlib.import_module(module)._run_here(quick)  # pylint: disable=protected-access
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}"))
  code = (f"import importlib, json; m = importlib.import_module({module!r}); "
          f"print('ROWS=' + json.dumps(m._run_here({quick!r})))")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout
  line = [l for l in out.splitlines() if l.startswith("ROWS=")][-1]
  return json.loads(line[len("ROWS="):])
