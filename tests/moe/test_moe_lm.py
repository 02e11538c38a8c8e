"""The moe_lm task: char_lm with MoE FFNs at equal active parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradax.experiments.tasks import get_task


def test_moe_lm_builds_trains_and_adds_aux_loss():
  task = get_task("moe_lm", d_model=16, num_layers=1, num_heads=2, seq_len=8)
  assert task.name == "moe_lm" and task.headline_metric == "bpc"
  params = task.init(jax.random.key(0))
  moe = params["block0"]["ffn"]["moe"]
  d, e, k = 16, 8, 2
  h = moe["wi"].shape[-1]
  assert moe["wi"].shape == (e, d, h) and moe["wo"].shape == (e, h, d)
  # Equal active parameters to char_lm's dense d -> 4d -> d FFN.
  assert k * 2 * d * h == 2 * d * 4 * d
  batch = task.train_batch(0, 4, 0)

  @jax.jit
  def sgd(params, batch):
    # One program: metrics at the current params and an SGD step.
    m = task.metrics(params, batch)
    g = jax.grad(task.loss)(params, batch)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, g), m

  losses = []
  for i in range(3):
    params, m = sgd(params, batch)
    if i == 0:
      assert float(m["aux_loss"]) > 0
      np.testing.assert_allclose(
          m["loss"], m["bpc"] * math.log(2) + m["aux_loss"], rtol=1e-5)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  assert all(math.isfinite(v) for v in losses)


def test_moe_lm_bad_option_raises():
  with pytest.raises(ValueError, match="k=3"):
    get_task("moe_lm", d_model=16, num_layers=1, k=3)
  with pytest.raises(ValueError, match="unknown option 'experts'"):
    get_task("moe_lm", experts=4)
