"""Learning-rate (and momentum) schedules that optax lacks.

* one-cycle (Smith & Topin, "Super-Convergence: Very Fast Training of Neural
  Networks Using Large Learning Rates", 2017, arXiv 1708.07120), with its
  inverse momentum cycle;
* linear scaling plus gradual warm-up keyed on the global batch size (Goyal et
  al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017,
  arXiv 1706.02677);
* warmup-stable-decay (Hu et al., "MiniCPM", 2024, arXiv 2404.06395; the
  1-sqrt cooldown from Hägele et al., "Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations", 2024, arXiv 2405.18392);
* inverse square root (Vaswani et al., "Attention Is All You Need", 2017,
  arXiv 1706.03762).

Every schedule maps the step count (0 at the first update) to a value and is
jittable, so it can be passed wherever optax takes a `ScalarOrSchedule`.
"""

import math
import numbers
from typing import Sequence

import jax.numpy as jnp
import optax

from gradax.optimizers import _tree

_ANNEAL = ("linear", "cos")
_DECAY_TYPES = ("linear", "1-sqrt", "cosine")


def _interp(start, end, frac, kind):
  """`start` at frac=0 to `end` at frac=1, linearly or along half a cosine."""
  frac = jnp.clip(frac, 0.0, 1.0)
  if kind == "linear":
    return start + (end - start) * frac
  return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def _check_int(name, value, low):
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
      or value < low):
    raise ValueError(
        f"{name} must be an integer >= {low}; got {name}={value!r}."
    )


def _check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}; got {name}={value!r}.")


def _phases(count, edges, values, kind):
  """Piecewise interpolation through (edges[i], values[i]); flat outside."""
  count = jnp.asarray(count, jnp.float32)
  out = jnp.asarray(values[-1], jnp.float32)
  # Walk the segments backwards so the earliest matching one wins.
  for i in range(len(edges) - 2, -1, -1):
    lo, hi = edges[i], edges[i + 1]
    frac = (count - lo) / max(hi - lo, 1)
    seg = _interp(values[i], values[i + 1], frac, kind)
    out = jnp.where(count < hi, seg, out)
  return out


def one_cycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> optax.Schedule:
  r"""One-cycle learning rate: a rise to a large peak, then a long fall.

  With :math:`T` = `transition_steps`, :math:`u = \mathrm{round}(p T)` for
  `pct_start` :math:`p`, :math:`\eta_0 = \eta_{max}/\mathrm{div}` and
  :math:`\eta_{min} = \eta_0/\mathrm{final\_div}`:

  * two phases: :math:`\eta_0 \to \eta_{max}` on :math:`[0, u]`, then
    :math:`\eta_{max} \to \eta_{min}` on :math:`[u, T]`;
  * three phases (Smith's original): :math:`\eta_0 \to \eta_{max}` on
    :math:`[0, u]`, :math:`\eta_{max} \to \eta_0` on :math:`[u, 2u]`, then the
    annihilation :math:`\eta_0 \to \eta_{min}` on :math:`[2u, T]`;

  each segment linear or half-cosine, constant :math:`\eta_{min}` after
  :math:`T`. Pick :math:`\eta_{max}` with the LR range test
  (`gradax.experiments.lr_range_test`) and pair the schedule with
  :func:`one_cycle_momentum_schedule`.

  Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks
  Using Large Learning Rates", 2017, arXiv 1708.07120.

  Args:
    transition_steps: total length :math:`T` of the cycle, >= 2.
    peak_value: the maximum learning rate, > 0.
    pct_start: fraction of the cycle spent rising, in (0, 1) (in (0, 0.5)
      with `three_phase`).
    div_factor: initial value is `peak_value / div_factor`; >= 1.
    final_div_factor: final value is `initial / final_div_factor`; >= 1.
    anneal_strategy: "cos" or "linear".
    three_phase: use the symmetric cycle plus an annihilation phase.

  Returns:
    A schedule `count -> learning rate`.

  Example::

    lr = gradax.optimizers.one_cycle_schedule(1000, peak_value=0.1)
    tx = optax.sgd(lr, momentum=0.9)
    lr(250)  # 0.1
  """
  _check_int("transition_steps", transition_steps, 2)
  _tree.check_range("peak_value", peak_value, 0.0, low_inclusive=False)
  _tree.check_range("div_factor", div_factor, 1.0)
  _tree.check_range("final_div_factor", final_div_factor, 1.0)
  init = peak_value / div_factor
  return _cycle(transition_steps, pct_start, anneal_strategy, three_phase,
                init, peak_value, init / final_div_factor)


def one_cycle_momentum_schedule(
    transition_steps: int,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    pct_start: float = 0.25,
    anneal_strategy: str = "cos",
    three_phase: bool = False,
) -> optax.Schedule:
  r"""The momentum cycle that mirrors :func:`one_cycle_schedule`.

  Momentum falls :math:`\beta_{max} \to \beta_{base}` while the learning rate
  rises and climbs back to :math:`\beta_{max}` while it falls (three phases:
  back to :math:`\beta_{max}` on :math:`[u, 2u]`, then flat). Use it through
  `optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=mom)`.

  Smith, "A disciplined approach to neural network hyper-parameters", 2018,
  arXiv 1803.09820.

  Args:
    transition_steps: total length of the cycle, >= 2.
    base_momentum: the lowest momentum, reached at the learning-rate peak.
    max_momentum: the momentum at both ends; base <= max < 1.
    pct_start: as in :func:`one_cycle_schedule`.
    anneal_strategy: "cos" or "linear".
    three_phase: as in :func:`one_cycle_schedule`.

  Returns:
    A schedule `count -> momentum`.

  Example::

    mom = gradax.optimizers.one_cycle_momentum_schedule(1000)
    mom(0), mom(250)  # 0.95, 0.85
  """
  _check_int("transition_steps", transition_steps, 2)
  _tree.check_range("max_momentum", max_momentum, 0.0, 1.0,
                    high_inclusive=False)
  _tree.check_range("base_momentum", base_momentum, 0.0, max_momentum)
  return _cycle(transition_steps, pct_start, anneal_strategy, three_phase,
                max_momentum, base_momentum, max_momentum)


def _cycle(transition_steps, pct_start, anneal_strategy, three_phase, start,
           turn, end) -> optax.Schedule:
  """The one-cycle shape: ``start -> turn`` on ``[0, u]``, then ``-> end``.

  ``u = round(pct_start * transition_steps)``. Three phases go back to
  ``start`` on ``[u, 2u]`` and then to ``end``. Checks ``pct_start`` and
  ``anneal_strategy``.
  """
  _tree.check_range("pct_start", pct_start, 0.0, 0.5 if three_phase else 1.0,
                    low_inclusive=False, high_inclusive=False)
  _check_choice("anneal_strategy", anneal_strategy, _ANNEAL)
  up = max(1, int(round(pct_start * transition_steps)))
  if three_phase:
    edges = (0, up, 2 * up, transition_steps)
    values = (start, turn, start, end)
  else:
    edges = (0, up, transition_steps)
    values = (start, turn, end)

  def schedule(count):
    return _phases(count, edges, values, anneal_strategy)

  return schedule


def linear_scaled_learning_rate(
    base_learning_rate: float,
    global_batch_size: int,
    base_batch_size: int = 256,
) -> float:
  r"""Goyal et al.'s linear scaling rule: :math:`\eta = \eta_{base} B / B_0`.

  Args:
    base_learning_rate: the learning rate tuned at `base_batch_size`, > 0.
    global_batch_size: the batch size summed over all replicas, >= 1.
    base_batch_size: the reference batch size (256 for ResNet-50), >= 1.

  Returns:
    The scaled learning rate as a Python float.

  Example::

    linear_scaled_learning_rate(0.1, 8192)  # 3.2
  """
  _tree.check_range("base_learning_rate", base_learning_rate, 0.0,
                    low_inclusive=False)
  _check_int("global_batch_size", global_batch_size, 1)
  _check_int("base_batch_size", base_batch_size, 1)
  return float(base_learning_rate) * global_batch_size / base_batch_size


def epochs_to_steps(epochs: float, dataset_size: int,
                    global_batch_size: int) -> int:
  """Number of optimizer steps in `epochs` passes at `global_batch_size`.

  Args:
    epochs: number of epochs, >= 0.
    dataset_size: examples per epoch, >= 1.
    global_batch_size: examples per step summed over replicas, >= 1.

  Returns:
    `ceil(epochs * dataset_size / global_batch_size)`.

  Example::

    epochs_to_steps(5, 1_281_167, 8192)  # 782
  """
  _tree.check_range("epochs", epochs, 0.0)
  _check_int("dataset_size", dataset_size, 1)
  _check_int("global_batch_size", global_batch_size, 1)
  return int(math.ceil(epochs * dataset_size / global_batch_size))


def linear_scaling_warmup_schedule(
    base_learning_rate: float,
    global_batch_size: int,
    base_batch_size: int = 256,
    warmup_steps: int = 0,
    warmup_init_value: float | None = None,
    decay_boundaries: Sequence[int] = (),
    decay_factor: float = 0.1,
) -> optax.Schedule:
  r"""Linear scaling with gradual warm-up, keyed on the global batch size.

  With :math:`k = B/B_0` and :math:`\eta = ` `base_learning_rate`, the rate
  rises linearly from :math:`\eta` (or `warmup_init_value`) at step 0 to
  :math:`k\eta` at `warmup_steps`, then stays at :math:`k\eta` and is
  multiplied by `decay_factor` at every step in `decay_boundaries` (absolute
  step counts; Goyal et al. use epochs 30, 60, 80, see
  :func:`epochs_to_steps`). Built with `optax.join_schedules`.

  Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
  2017, arXiv 1706.02677.

  Args:
    base_learning_rate: learning rate tuned at `base_batch_size` (0.1), > 0.
    global_batch_size: batch size summed over all replicas, >= 1.
    base_batch_size: reference batch size, >= 1.
    warmup_steps: length of the warm-up (Goyal et al.: 5 epochs), >= 0.
    warmup_init_value: value at step 0; defaults to `base_learning_rate`.
    decay_boundaries: strictly increasing steps, each >= `warmup_steps`.
    decay_factor: multiplier at each boundary, in (0, 1].

  Returns:
    A schedule `count -> learning rate`.

  Example::

    lr = linear_scaling_warmup_schedule(0.1, 8192, warmup_steps=782)
    lr(0), lr(782)  # 0.1, 3.2
  """
  peak = linear_scaled_learning_rate(base_learning_rate, global_batch_size,
                                     base_batch_size)
  _check_int("warmup_steps", warmup_steps, 0)
  _tree.check_range("decay_factor", decay_factor, 0.0, 1.0,
                    low_inclusive=False)
  if warmup_init_value is None:
    warmup_init_value = float(base_learning_rate)
  _tree.check_range("warmup_init_value", warmup_init_value, 0.0)
  bounds = [int(b) for b in decay_boundaries]
  if any(b < warmup_steps for b in bounds) or any(
      b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
    raise ValueError(
        "decay_boundaries must be strictly increasing and each >= "
        f"warmup_steps={warmup_steps}; got decay_boundaries={tuple(bounds)}."
    )
  stable = optax.piecewise_constant_schedule(
      peak, {b - warmup_steps: decay_factor for b in bounds})
  if warmup_steps == 0:
    return stable
  warmup = optax.linear_schedule(warmup_init_value, peak, warmup_steps)
  return optax.join_schedules([warmup, stable], [warmup_steps])


def warmup_stable_decay_schedule(
    peak_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    decay_fraction: float = 0.2,
    init_value: float = 0.0,
    end_value: float = 0.0,
    decay_type: str = "1-sqrt",
) -> optax.Schedule:
  r"""Warmup-stable-decay (WSD, "trapezoidal") learning rate.

  With :math:`w` = `warmup_steps`, :math:`d` = `decay_steps` and :math:`T` =
  `total_steps`, :math:`s = T - d` and :math:`f = (t - s)/d`:

  .. math::
    \eta_t = \begin{cases}
      \eta_{init} + (\eta_{peak} - \eta_{init})\, t/w & t < w \\
      \eta_{peak} & w \le t < s \\
      \eta_{end} + (\eta_{peak} - \eta_{end})\, c(f) & s \le t \le T \\
      \eta_{end} & t > T
    \end{cases}

  with cooldown shape :math:`c(f) = 1 - f` ("linear"), :math:`1 - \sqrt{f}`
  ("1-sqrt") or :math:`(1 + \cos \pi f)/2` ("cosine").

  Hu et al., "MiniCPM: Unveiling the Potential of Small Language Models with
  Scalable Training Strategies", 2024, arXiv 2404.06395; Hägele et al.,
  "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
  2024, arXiv 2405.18392 (the 1-sqrt cooldown).

  Args:
    peak_value: the stable learning rate, > 0.
    total_steps: :math:`T`, >= 1.
    warmup_steps: :math:`w`, >= 0.
    decay_steps: :math:`d`; if None, `round(decay_fraction * total_steps)`.
    decay_fraction: used only when `decay_steps` is None; in [0, 1].
    init_value: learning rate at step 0, >= 0.
    end_value: learning rate at and after `total_steps`, >= 0.
    decay_type: "linear", "1-sqrt" or "cosine".

  Returns:
    A schedule `count -> learning rate`.

  Example::

    lr = warmup_stable_decay_schedule(1e-3, 10_000, warmup_steps=500)
    tx = optax.adamw(lr)
  """
  _tree.check_range("peak_value", peak_value, 0.0, low_inclusive=False)
  _check_int("total_steps", total_steps, 1)
  _check_int("warmup_steps", warmup_steps, 0)
  _tree.check_range("decay_fraction", decay_fraction, 0.0, 1.0)
  _tree.check_range("init_value", init_value, 0.0)
  _tree.check_range("end_value", end_value, 0.0)
  _check_choice("decay_type", decay_type, _DECAY_TYPES)
  if decay_steps is None:
    decay_steps = int(round(decay_fraction * total_steps))
  _check_int("decay_steps", decay_steps, 0)
  if warmup_steps + decay_steps > total_steps:
    raise ValueError(
        "warmup_steps + decay_steps must be <= total_steps; got "
        f"warmup_steps={warmup_steps}, decay_steps={decay_steps}, "
        f"total_steps={total_steps}."
    )
  start = total_steps - decay_steps

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = init_value + (peak_value - init_value) * t / max(warmup_steps, 1)
    frac = jnp.clip((t - start) / max(decay_steps, 1), 0.0, 1.0)
    if decay_type == "linear":
      shape = 1.0 - frac
    elif decay_type == "1-sqrt":
      shape = 1.0 - jnp.sqrt(frac)
    else:
      shape = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    cool = end_value + (peak_value - end_value) * shape
    out = jnp.where(t < start, peak_value, cool)
    out = jnp.where(t >= total_steps, end_value, out)
    return jnp.where(t < warmup_steps, warm, out)

  return schedule


def inverse_sqrt_schedule(
    peak_value: float,
    warmup_steps: int = 0,
    init_value: float = 0.0,
    timescale: int | None = None,
) -> optax.Schedule:
  r"""Linear warm-up then inverse-square-root decay.

  .. math::
    \eta_t = \begin{cases}
      \eta_{init} + (\eta_{peak} - \eta_{init})\, t/w & t < w \\
      \eta_{peak} \sqrt{\tau / \max(t, \tau)} & t \ge w
    \end{cases}

  with :math:`\tau` = `timescale` (default :math:`\max(w, 1)`, which is
  Vaswani et al.'s :math:`d^{-1/2}\min(t^{-1/2}, t\,w^{-3/2})` up to the
  peak's scale).

  Vaswani et al., "Attention Is All You Need", 2017, arXiv 1706.03762.

  Args:
    peak_value: the learning rate at the end of warm-up, > 0.
    warmup_steps: :math:`w`, >= 0.
    init_value: learning rate at step 0 when `warmup_steps` > 0, >= 0.
    timescale: :math:`\tau` >= max(warmup_steps, 1); decay starts after it.

  Returns:
    A schedule `count -> learning rate`.

  Example::

    lr = inverse_sqrt_schedule(1e-3, warmup_steps=4000)
    lr(4000), lr(16000)  # 1e-3, 5e-4
  """
  _tree.check_range("peak_value", peak_value, 0.0, low_inclusive=False)
  _check_int("warmup_steps", warmup_steps, 0)
  _tree.check_range("init_value", init_value, 0.0)
  if timescale is None:
    timescale = max(warmup_steps, 1)
  _check_int("timescale", timescale, max(warmup_steps, 1))

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = init_value + (peak_value - init_value) * t / max(warmup_steps, 1)
    decay = peak_value * jnp.sqrt(timescale / jnp.maximum(t, timescale))
    return jnp.where(t < warmup_steps, warm, decay)

  return schedule
