"""Timing helpers for benchmarks (``experiments/benchmarks/*.py``).

Benchmarks measure ratios side by side in one run; these helpers give each
side the same treatment: warm-up calls (compilation, caches), then the median
of several timed calls, each of which blocks until its outputs are ready.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


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
