"""The LR range test finds the stability edge of SGD on a known quadratic."""

import numpy as np
import optax
import pytest

from gradax.experiments import lr_range_test as lrt
from gradax.experiments import tasks


@pytest.fixture(scope="module")
def quad_result():
  # h in [1, 100]: SGD is stable iff lr < 2 / 100 = 0.02.
  task = tasks.get_task("quadratic", condition=100.0, noise=0.1)
  return lrt.lr_range_test(task, lambda s: optax.sgd(s), min_lr=1e-4,
                           max_lr=1.0, num_steps=200, batch_size=4, seed=0)


def test_sweep_is_exponential(quad_result):
  r = quad_result
  n = len(r.learning_rates)
  want = 1e-4 * (1.0 / 1e-4) ** (np.arange(n) / 199)
  np.testing.assert_allclose(r.learning_rates, want, rtol=1e-9)
  assert len(r.losses) == len(r.smoothed_losses) == n


def test_divergence_is_just_past_the_stability_edge(quad_result):
  r = quad_result
  assert r.diverged_lr is not None
  assert 0.02 < r.diverged_lr < 0.1  # cannot diverge below 2 / h_max
  assert r.suggested_lr < 0.02
  assert r.min_loss_lr < r.diverged_lr
  # the curve is cut before the blow-up
  assert np.all(np.isfinite(r.smoothed_losses))
  assert r.learning_rates[-1] < r.diverged_lr


def test_digits_and_plot(tmp_path):
  task = tasks.get_task("digits_mlp", hidden=16)
  r = lrt.lr_range_test(task, min_lr=1e-3, max_lr=1.0, num_steps=30,
                        batch_size=16)
  assert r.smoothed_losses.min() < r.smoothed_losses[0]  # it learned
  assert 1e-3 <= r.suggested_lr <= 1.0
  path = tmp_path / "lr.png"
  lrt.plot(r, str(path), title="digits")
  assert path.stat().st_size > 1000


@pytest.mark.parametrize("kwargs, name", [
    ({"min_lr": 0.0}, "min_lr"), ({"min_lr": 1.0, "max_lr": 0.5}, "max_lr"),
    ({"num_steps": 1}, "num_steps"), ({"smoothing": 1.0}, "smoothing"),
    ({"divergence_factor": 1.0}, "divergence_factor")])
def test_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    lrt.lr_range_test("quadratic", **kwargs)
