"""Schedules against their closed forms, including the boundaries."""

import math

import jax
import numpy as np
import optax
import pytest

from gradax import optimizers as o


def _vals(sched, steps):
  return np.array([float(sched(t)) for t in steps])


def test_one_cycle_two_phase_cos():
  s = o.one_cycle_schedule(100, peak_value=1.0, pct_start=0.3, div_factor=10,
                           final_div_factor=100)
  init, final = 0.1, 0.001
  assert float(s(0)) == pytest.approx(init)
  assert float(s(30)) == pytest.approx(1.0)
  assert float(s(100)) == pytest.approx(final)
  assert float(s(500)) == pytest.approx(final)
  f = 15 / 30
  assert float(s(15)) == pytest.approx(
      1.0 + (init - 1.0) * 0.5 * (1 + math.cos(math.pi * f)), rel=1e-5)
  f = 35 / 70
  assert float(s(65)) == pytest.approx(
      final + (1.0 - final) * 0.5 * (1 + math.cos(math.pi * f)), rel=1e-5)


def test_one_cycle_three_phase_linear_and_momentum():
  s = o.one_cycle_schedule(100, 1.0, pct_start=0.25, div_factor=4,
                           final_div_factor=5, anneal_strategy="linear",
                           three_phase=True)
  np.testing.assert_allclose(_vals(s, [0, 10, 25, 40, 50, 75, 100]),
                             [0.25, 0.25 + 0.75 * 0.4, 1.0, 1 - 0.75 * 0.6,
                              0.25, 0.25 - 0.2 * 0.5, 0.05], rtol=1e-5)
  m = o.one_cycle_momentum_schedule(100, 0.85, 0.95, pct_start=0.25,
                                    anneal_strategy="linear")
  np.testing.assert_allclose(_vals(m, [0, 25, 100, 200]),
                             [0.95, 0.85, 0.95, 0.95], rtol=1e-6)
  np.testing.assert_allclose(float(m(10)), 0.95 - 0.1 * 0.4, rtol=1e-6)


def test_linear_scaling_warmup_goyal():
  # B = 8192 -> k = 32; warm-up from 0.1 to 3.2 over 100 steps, /10 at 300
  s = o.linear_scaling_warmup_schedule(0.1, 8192, warmup_steps=100,
                                       decay_boundaries=(300, 400))
  np.testing.assert_allclose(
      _vals(s, [0, 50, 100, 299, 300, 399, 400, 1000]),
      [0.1, 0.1 + 3.1 * 0.5, 3.2, 3.2, 0.32, 0.32, 0.032, 0.032], rtol=1e-5)
  assert o.linear_scaled_learning_rate(0.1, 512) == pytest.approx(0.2)
  assert o.epochs_to_steps(5, 1_281_167, 8192) == 782
  no_warm = o.linear_scaling_warmup_schedule(0.1, 1024)
  assert float(no_warm(0)) == pytest.approx(0.4)


@pytest.mark.parametrize("kind", ["linear", "1-sqrt", "cosine"])
def test_wsd(kind):
  s = o.warmup_stable_decay_schedule(2.0, total_steps=100, warmup_steps=10,
                                     decay_steps=40, init_value=0.0,
                                     end_value=0.2, decay_type=kind)
  shape = {"linear": lambda f: 1 - f, "1-sqrt": lambda f: 1 - math.sqrt(f),
           "cosine": lambda f: 0.5 * (1 + math.cos(math.pi * f))}[kind]
  want = lambda t: 0.2 + 1.8 * shape((t - 60) / 40)
  np.testing.assert_allclose(
      _vals(s, [0, 5, 10, 59, 60, 70, 90, 100, 150]),
      [0.0, 1.0, 2.0, 2.0, 2.0, want(70), want(90), 0.2, 0.2], rtol=1e-5)


def test_wsd_default_decay_fraction_and_jit():
  s = o.warmup_stable_decay_schedule(1.0, total_steps=50)
  assert float(jax.jit(s)(39)) == pytest.approx(1.0)
  assert float(s(45)) == pytest.approx(1 - math.sqrt(0.5), rel=1e-5)


def test_inverse_sqrt():
  s = o.inverse_sqrt_schedule(1e-3, warmup_steps=4000)
  np.testing.assert_allclose(_vals(s, [0, 2000, 4000, 16000]),
                             [0.0, 5e-4, 1e-3, 5e-4], rtol=1e-5)
  s0 = o.inverse_sqrt_schedule(1.0)
  np.testing.assert_allclose(_vals(s0, [0, 1, 4, 100]), [1, 1, 0.5, 0.1],
                             rtol=1e-6)
  # usable as an optax learning rate
  tx = optax.sgd(s)
  assert tx.init(np.zeros(2)) is not None


@pytest.mark.parametrize("fn, kwargs, name", [
    (o.one_cycle_schedule, {"transition_steps": 1, "peak_value": 1.0},
     "transition_steps"),
    (o.one_cycle_schedule, {"transition_steps": 10, "peak_value": 1.0,
                            "pct_start": 1.0}, "pct_start"),
    (o.one_cycle_schedule, {"transition_steps": 10, "peak_value": 1.0,
                            "anneal_strategy": "exp"}, "anneal_strategy"),
    (o.warmup_stable_decay_schedule, {"peak_value": 1.0, "total_steps": 10,
                                      "warmup_steps": 8, "decay_steps": 5},
     "warmup_steps"),
    (o.warmup_stable_decay_schedule, {"peak_value": 1.0, "total_steps": 10,
                                      "decay_type": "exp"}, "decay_type"),
    (o.inverse_sqrt_schedule, {"peak_value": -1.0}, "peak_value"),
    (o.linear_scaling_warmup_schedule, {"base_learning_rate": 0.1,
                                        "global_batch_size": 0},
     "global_batch_size"),
    (o.linear_scaling_warmup_schedule, {"base_learning_rate": 0.1,
                                        "global_batch_size": 512,
                                        "warmup_steps": 10,
                                        "decay_boundaries": (5,)},
     "decay_boundaries"),
])
def test_bad_arguments(fn, kwargs, name):
  with pytest.raises(ValueError, match=name):
    fn(**kwargs)
