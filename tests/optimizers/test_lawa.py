"""LAWA's averaged params against a manual average of the last k checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradax import optimizers


def _grads(t):
  return {"w": jnp.array([np.sin(t), np.cos(t)], jnp.float32),
          "b": jnp.array(0.1 * t, jnp.float32)}


def test_eval_params_is_mean_of_last_k_checkpoints():
  k, every, steps = 3, 2, 11
  base = optax.sgd(0.1, momentum=0.5)
  tx = optimizers.lawa(base, num_checkpoints=k, checkpoint_every=every)
  params = {"w": jnp.array([1.0, -1.0]), "b": jnp.array(0.5)}
  ref_params = params
  state, ref_state = tx.init(params), base.init(params)
  history = []
  update = jax.jit(tx.update)
  for t in range(steps):
    # before any checkpoint: the raw iterate
    if t < every:
      got = optimizers.lawa_eval_params(state, params)
      np.testing.assert_array_equal(got["w"], params["w"])
    u, state = update(_grads(t), state, params)
    params = optax.apply_updates(params, u)
    # training follows the base optimizer exactly
    ru, ref_state = base.update(_grads(t), ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ru)
    np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-6)
    history.append(params)
  # checkpoints after steps 2, 4, 6, 8, 10 (1-based); the last 3: 6, 8, 10
  last = [history[i - 1] for i in (6, 8, 10)]
  want = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *last)
  got = optimizers.lawa_eval_params(state, params)
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
  np.testing.assert_allclose(got["b"], want["b"], rtol=1e-6)
  assert int(state.num_filled) == k


def test_partial_buffer_averages_only_filled_slots():
  tx = optimizers.lawa(optax.sgd(1.0), num_checkpoints=4, checkpoint_every=1)
  p = jnp.array([0.0])
  s = tx.init(p)
  for g in (-1.0, -2.0):  # params become 1, then 3
    u, s = tx.update(jnp.array([g]), s, p)
    p = optax.apply_updates(p, u)
  np.testing.assert_allclose(optimizers.lawa_eval_params(s, p), [2.0])


def test_found_inside_chain_and_alias():
  tx = optax.chain(optax.identity(),
                   optimizers.lawa_adamw(1e-2, num_checkpoints=2,
                                         checkpoint_every=1))
  p = jnp.array([1.0, 2.0])
  s = tx.init(p)
  u, s = tx.update(jnp.array([1.0, 1.0]), s, p)
  p = optax.apply_updates(p, u)
  np.testing.assert_allclose(optimizers.lawa_eval_params(s, p), p)


def test_bf16_params_keep_dtype():
  tx = optimizers.lawa(optax.sgd(0.1), num_checkpoints=2, checkpoint_every=1)
  p = jnp.ones((3,), jnp.bfloat16)
  s = tx.init(p)
  u, s = tx.update(p, s, p)
  assert u.dtype == jnp.bfloat16
  assert optimizers.lawa_eval_params(s, p).dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, name", [
    ({"num_checkpoints": 0}, "num_checkpoints"),
    ({"checkpoint_every": 0}, "checkpoint_every")])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optimizers.lawa(optax.sgd(0.1), **kwargs)


def test_update_without_params_raises():
  tx = optimizers.lawa(optax.sgd(0.1))
  p = jnp.zeros(2)
  with pytest.raises(ValueError, match="params"):
    tx.update(p, tx.init(p))
