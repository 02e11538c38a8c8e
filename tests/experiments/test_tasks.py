"""Sanity checks of the built-in tasks against closed forms and invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gradax.experiments import tasks


def _train(task, steps, lr, batch_size=32):
  params = jax.jit(task.init)(jax.random.key(0))
  tx = optax.adam(lr)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, g = jax.value_and_grad(task.loss)(params, batch)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, loss

  losses = []
  for i in range(steps):
    params, state, loss = step(params, state, task.train_batch(i, batch_size, 0))
    losses.append(float(loss))
  return params, losses


def test_unknown_task_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown task 'nope'; valid tasks are .*char_lm.*digits_mlp"):
    tasks.get_task("nope")


def test_unknown_task_option_is_named():
  with pytest.raises(ValueError, match=r"unknown option 'width'"):
    tasks.get_task("digits_mlp", width=3)
  with pytest.raises(ValueError, match=r"d_model=30 is not divisible by num_heads=4"):
    tasks.get_task("char_lm", d_model=30)


@pytest.mark.parametrize("name", ["digits_mlp", "char_lm", "quadratic", "rosenbrock"])
def test_batches_are_functions_of_step_and_seed(name):
  task = tasks.get_task(name)
  a, b = task.train_batch(3, 16, 7), task.train_batch(3, 16, 7)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    assert a[k].shape[0] == 16
  assert all(v.shape[0] % 8 == 0 for v in task.eval_batch().values())
  params = jax.jit(task.init)(jax.random.key(0))
  assert isinstance(params, dict)
  m = jax.jit(task.metrics)(params, task.eval_batch())
  assert {"loss", task.headline_metric} <= set(m)


def test_batches_differ_across_steps():
  task = tasks.get_task("char_lm")
  assert not np.array_equal(task.train_batch(0, 8, 0)["x"], task.train_batch(1, 8, 0)["x"])
  assert not np.array_equal(task.train_batch(0, 8, 0)["x"], task.train_batch(0, 8, 1)["x"])


def test_char_lm_corpus_and_windows():
  train, held = tasks.char_lm_corpus()
  total = len(train) + len(held)
  assert abs(len(held) / total - 0.1) < 1e-3
  b = tasks.get_task("char_lm", seq_len=32).train_batch(0, 4, 0)
  np.testing.assert_array_equal(b["x"][:, 1:], b["y"][:, :-1])  # targets are next bytes
  raw = bytes(train)
  for row in np.concatenate([b["x"], b["y"][:, -1:]], axis=1):
    assert bytes(row.astype(np.uint8)) in raw  # a contiguous window of the train split


def test_char_lm_bpc_of_uniform_model_is_8_bits():
  task = tasks.get_task("char_lm")
  params = jax.jit(task.init)(jax.random.key(0))
  params["head"] = jax.tree.map(jnp.zeros_like, params["head"])  # logits all 0
  m = jax.jit(task.metrics)(params, task.eval_batch())
  np.testing.assert_allclose(m["bpc"], 8.0, rtol=1e-6)
  np.testing.assert_allclose(m["loss"], math.log(256), rtol=1e-6)


class _ConstAuxFFN(nnx.Module):

  def __init__(self, d_model, rngs):
    self.lin = nnx.Linear(d_model, d_model, rngs=rngs)

  def __call__(self, x):
    return self.lin(x), jnp.float32(0.25)


def test_char_lm_ffn_plugin_adds_aux_losses():
  task = tasks.make_char_lm(ffn=_ConstAuxFFN, name="plug", num_layers=3, d_model=16,
                            num_heads=2, seq_len=8)
  params = jax.jit(task.init)(jax.random.key(1))
  assert "lin" in params["block0"]["ffn"]
  batch = task.train_batch(0, 8, 0)
  m = jax.jit(task.metrics)(params, batch)
  np.testing.assert_allclose(m["aux_loss"], 0.75, rtol=1e-6)
  np.testing.assert_allclose(m["loss"], m["bpc"] * math.log(2) + 0.75, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(task.loss)(params, batch), m["loss"], rtol=1e-6)


def test_char_lm_learns():
  task = tasks.get_task("char_lm", d_model=32, num_layers=1, seq_len=16)
  params = jax.jit(task.init)(jax.random.key(0))
  tx = optax.adam(1e-2)
  batch = task.train_batch(0, 8, 0)

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(task.loss)(params, batch)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, loss

  state = tx.init(params)
  losses = []
  for _ in range(15):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 1.0  # gradients flow through every parameter group


def test_digits_mlp_learns():
  task = tasks.get_task("digits_mlp")
  params, _ = _train(task, 150, 1e-2)
  assert float(task.metrics(params, task.eval_batch())["accuracy"]) > 0.85


def test_quadratic_closed_form():
  task = tasks.get_task("quadratic", dim=8, condition=100.0)
  params = jax.jit(task.init)(jax.random.key(0))
  h = np.logspace(0, 2, 8)
  center = np.random.default_rng(3).normal(size=8)
  m = task.metrics(params, task.eval_batch())
  np.testing.assert_allclose(m["suboptimality"], 0.5 * np.sum(h * center ** 2), rtol=1e-5)
  at_min = {"x": jnp.asarray(center, jnp.float32)}
  g = jax.grad(task.loss)(at_min, task.train_batch(0, 8, 0))
  np.testing.assert_allclose(g["x"], 0.0, atol=1e-4)
  hess = jax.hessian(lambda x: task.loss({"x": x}, task.eval_batch()))(at_min["x"])
  np.testing.assert_allclose(np.diag(hess), h, rtol=1e-5)


def test_rosenbrock_known_values():
  task = tasks.get_task("rosenbrock")
  batch = task.eval_batch()
  np.testing.assert_allclose(task.loss(task.init(jax.random.key(0)), batch), 24.2, rtol=1e-6)
  assert float(task.loss({"x": jnp.ones(2)}, batch)) == 0.0
  np.testing.assert_allclose(jax.grad(task.loss)({"x": jnp.ones(2)}, batch)["x"], 0.0)
