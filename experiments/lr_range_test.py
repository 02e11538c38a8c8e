"""LR range test: sweep the learning rate exponentially and watch the loss.

Smith, "Cyclical Learning Rates for Training Neural Networks", 2017,
arXiv 1506.01186 (section 3.3); used to pick the peak of
`gradax.optimizers.one_cycle_schedule` (Smith & Topin, arXiv 1708.07120).

Library use::

  from gradax.experiments import lr_range_test as lrt
  result = lrt.lr_range_test("digits_mlp", num_steps=100)
  result.suggested_lr            # steepest descent of the smoothed loss
  lrt.plot(result, "lr_range.png")

Command line::

  python -m gradax.experiments.lr_range_test --task=digits_mlp --plot=lr.png
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradax.experiments import tasks as tasks_lib

OptimizerFactory = Callable[[optax.Schedule], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class LRRangeResult:
  """The loss-vs-learning-rate curve of a range test.

  Attributes:
    learning_rates: the rate used at each step kept (up to divergence).
    losses: the raw training loss at each of those steps.
    smoothed_losses: the bias-corrected EMA of `losses`.
    suggested_lr: the rate where the smoothed loss falls fastest against
      log(lr), ignoring the first 10% of the curve (Smith's "start of the
      steepest descent").
    min_loss_lr: the rate at the smallest smoothed loss; a common one-cycle
      peak is `min_loss_lr / 10`.
    diverged_lr: the first rate where the smoothed loss exceeded
      `divergence_factor` times its minimum (or was not finite); None if the
      sweep never diverged.
  """

  learning_rates: np.ndarray
  losses: np.ndarray
  smoothed_losses: np.ndarray
  suggested_lr: float
  min_loss_lr: float
  diverged_lr: float | None


def _default_optimizer(schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.sgd(schedule, momentum=0.9)


def lr_range_test(
    task: str | tasks_lib.Task,
    optimizer: OptimizerFactory | None = None,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_steps: int = 100,
    batch_size: int = 32,
    seed: int = 0,
    smoothing: float = 0.98,
    divergence_factor: float = 4.0,
) -> LRRangeResult:
  r"""Trains for `num_steps` with :math:`\eta_t` growing from min to max.

  .. math::
    \eta_t = \eta_{min} (\eta_{max}/\eta_{min})^{t/(N-1)}, \qquad
    \bar\ell_t = \frac{\beta s_{t-1} + (1-\beta)\ell_t}{1-\beta^{t+1}}

  (:math:`s` the undebiased EMA). The curve is cut at the first step whose
  smoothed loss exceeds `divergence_factor` times the best so far (or is not
  finite). All steps run in one `lax.scan`.

  Args:
    task: a task name for `gradax.experiments.tasks.get_task`, or a `Task`.
    optimizer: `optimizer(schedule) -> GradientTransformation`; defaults to
      SGD with momentum 0.9.
    min_lr: first learning rate, > 0.
    max_lr: last learning rate, > min_lr.
    num_steps: sweep length N >= 2.
    batch_size: training batch size >= 1.
    seed: seed of the params and the batches.
    smoothing: EMA factor :math:`\beta` in [0, 1).
    divergence_factor: stop factor > 1.

  Returns:
    An :class:`LRRangeResult`.

  Example::

    r = lr_range_test("digits_mlp", lambda lr: optax.adam(lr), num_steps=80)
    peak = r.suggested_lr
  """
  if not min_lr > 0:
    raise ValueError(f"min_lr must be > 0; got min_lr={min_lr!r}.")
  if not max_lr > min_lr:
    raise ValueError(
        f"max_lr must be > min_lr={min_lr!r}; got max_lr={max_lr!r}.")
  if not isinstance(num_steps, int) or num_steps < 2:
    raise ValueError(f"num_steps must be an integer >= 2; got "
                     f"num_steps={num_steps!r}.")
  if not 0 <= smoothing < 1:
    raise ValueError(f"smoothing must be in [0, 1); got smoothing={smoothing!r}.")
  if not divergence_factor > 1:
    raise ValueError("divergence_factor must be > 1; got "
                     f"divergence_factor={divergence_factor!r}.")
  if isinstance(task, str):
    task = tasks_lib.get_task(task)
  optimizer = optimizer or _default_optimizer

  ratio = math.log(max_lr / min_lr) / (num_steps - 1)
  schedule = lambda t: min_lr * jnp.exp(ratio * jnp.asarray(t, jnp.float32))
  lrs = min_lr * np.exp(ratio * np.arange(num_steps))
  tx = optimizer(schedule)
  params = task.init(jax.random.key(seed))
  batches = [task.train_batch(t, batch_size, seed) for t in range(num_steps)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)

  def body(carry, batch):
    p, s = carry
    loss, g = jax.value_and_grad(task.loss)(p, batch)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), loss

  _, losses = jax.jit(lambda p, s, b: jax.lax.scan(body, (p, s), b))(
      params, tx.init(params), stacked)
  losses = np.asarray(losses, np.float64)

  smoothed = np.empty_like(losses)
  avg, best, stop = 0.0, math.inf, num_steps
  for t, loss in enumerate(losses):
    avg = smoothing * avg + (1 - smoothing) * loss
    smoothed[t] = avg / (1 - smoothing ** (t + 1))
    if not np.isfinite(smoothed[t]) or (
        t > 0 and smoothed[t] > divergence_factor * best):
      stop = t
      break
    best = min(best, smoothed[t])
  diverged_lr = float(lrs[stop]) if stop < num_steps else None
  keep = max(stop, 2)
  lrs, losses, smoothed = lrs[:keep], losses[:keep], smoothed[:keep]
  slope = np.gradient(smoothed, np.log(lrs))
  # Skip the first 10% of the kept curve: the EMA is still warming up there.
  skip = min(keep // 10, keep - 1)
  steepest = skip + int(np.argmin(slope[skip:]))
  return LRRangeResult(
      learning_rates=lrs, losses=losses, smoothed_losses=smoothed,
      suggested_lr=float(lrs[steepest]),
      min_loss_lr=float(lrs[int(np.argmin(smoothed))]),
      diverged_lr=diverged_lr)


def plot(result: LRRangeResult, path: str | None = None, title: str = ""
         ) -> Any:
  """Plots the smoothed loss against the learning rate (log x-axis).

  Args:
    result: from :func:`lr_range_test`.
    path: where to save the figure (PNG, PDF, ...); None to only return it.
    title: optional title.

  Returns:
    The matplotlib figure.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  if path is not None:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(result.learning_rates, result.losses, alpha=0.3, label="loss")
  ax.plot(result.learning_rates, result.smoothed_losses, label="smoothed")
  ax.axvline(result.suggested_lr, ls="--", c="k",
             label=f"suggested {result.suggested_lr:.2e}")
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("training loss")
  if title:
    ax.set_title(title)
  ax.legend()
  if path is not None:
    fig.savefig(path, bbox_inches="tight")
  return fig


def main(argv: list[str] | None = None) -> LRRangeResult:
  """Command-line entry point; prints the suggestion."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--task", default="digits_mlp")
  ap.add_argument("--optimizer", default="sgd",
                  help="sgd (momentum 0.9) or adam")
  ap.add_argument("--min_lr", type=float, default=1e-6)
  ap.add_argument("--max_lr", type=float, default=1.0)
  ap.add_argument("--num_steps", type=int, default=100)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--plot", default=None, help="path of a figure to write")
  args = ap.parse_args(argv)
  factories = {"sgd": _default_optimizer, "adam": optax.adam}
  if args.optimizer not in factories:
    raise SystemExit(f"--optimizer must be one of {sorted(factories)}; got "
                     f"{args.optimizer!r}.")
  result = lr_range_test(args.task, factories[args.optimizer], args.min_lr,
                         args.max_lr, args.num_steps, args.batch_size,
                         args.seed)
  print(f"suggested lr: {result.suggested_lr:.3e}  min-loss lr: "
        f"{result.min_loss_lr:.3e}  diverged at: {result.diverged_lr}")
  if args.plot:
    plot(result, args.plot, title=f"{args.task} / {args.optimizer}")
  return result


if __name__ == "__main__":
  main()
