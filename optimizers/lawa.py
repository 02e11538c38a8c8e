"""LAWA: latest weight averaging.

Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with
Latest Weight Averaging", 2022, arXiv 2209.14981; Sanyal et al., "Early Weight
Averaging meets High Learning Rates for LLM Pre-training", 2023,
arXiv 2306.03241.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from gradax.optimizers import _tree


class LawaState(NamedTuple):
  """State of :func:`lawa`.

  Attributes:
    count: optimizer steps taken, shape=(), int32.
    write_index: ring-buffer slot written next, shape=(), int32.
    num_filled: checkpoints held so far, at most k, shape=(), int32.
    checkpoints: like params, each leaf with a leading axis of size k.
    inner_state: the base optimizer's state.
  """

  count: jax.Array
  write_index: jax.Array
  num_filled: jax.Array
  checkpoints: optax.Params
  inner_state: optax.OptState


def lawa(
    base_optimizer: optax.GradientTransformation,
    num_checkpoints: int = 5,
    checkpoint_every: int = 100,
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps the last k checkpoints of the iterate for uniform averaging.

  Training follows `base_optimizer` unchanged. Every `checkpoint_every` steps
  (an "epoch" in the paper) the new iterate :math:`x_t` is written into a ring
  buffer of k slots; the params to *evaluate* are

  .. math::
    \bar x = \frac{1}{\min(n, k)} \sum_{j=0}^{\min(n,k)-1} x_{e_{n-j}},

  the mean of the last :math:`\min(n, k)` checkpoints (:math:`n` written so
  far), returned by :func:`lawa_eval_params` (AlgoPerf's
  ``prepare_for_eval``). Unlike SWA or an EMA, older checkpoints drop out.

  Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training
  with Latest Weight Averaging", 2022, arXiv 2209.14981.

  Args:
    base_optimizer: the optimizer that trains the raw iterate.
    num_checkpoints: k >= 1, the number of checkpoints averaged.
    checkpoint_every: steps between checkpoints, >= 1.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` needs `params`.

  Example::

    tx = gradax.optimizers.lawa(optax.adamw(1e-3), num_checkpoints=5)
    updates, state = tx.update(grads, state, params)
    eval_params = gradax.optimizers.lawa_eval_params(state, params)
  """
  # Under `inject_hyperparams` these arrive as arrays (traced in `update`):
  # only concrete values are checked, and `update` reads k from the buffer.
  for name, value in (("num_checkpoints", num_checkpoints),
                      ("checkpoint_every", checkpoint_every)):
    if _tree.is_concrete_number(value) and (
        float(value) != int(value) or int(value) < 1):
      raise ValueError(f"{name} must be an integer >= 1; got {name}={value!r}.")
  base_optimizer = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    k = int(num_checkpoints)
    return LawaState(
        count=jnp.zeros([], jnp.int32),
        write_index=jnp.zeros([], jnp.int32),
        num_filled=jnp.zeros([], jnp.int32),
        checkpoints=_tree.stacked_zeros_like(params, k),
        inner_state=base_optimizer.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("lawa needs params; got params=None.")
    updates, inner_state = base_optimizer.update(
        updates, state.inner_state, params, **extra_args)
    count = numerics.safe_int32_increment(state.count)
    k = jax.tree.leaves(state.checkpoints)[0].shape[0]
    save = (count % checkpoint_every) == 0
    new_params = optax.apply_updates(params, updates)
    idx = state.write_index

    def write(buf, p):
      row = jnp.where(save, p.astype(buf.dtype), buf[idx])
      return jax.lax.dynamic_update_index_in_dim(buf, row, idx, axis=0)

    checkpoints = jax.tree.map(write, state.checkpoints, new_params)
    write_index = jnp.where(save, (idx + 1) % k, idx).astype(jnp.int32)
    num_filled = jnp.where(save, jnp.minimum(state.num_filled + 1, k),
                           state.num_filled).astype(jnp.int32)
    return updates, LawaState(count=count, write_index=write_index,
                              num_filled=num_filled, checkpoints=checkpoints,
                              inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_lawa_state(state: Any) -> LawaState:
  if isinstance(state, LawaState):
    return state
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, LawaState))
           if isinstance(s, LawaState)]
  if len(found) != 1:
    raise ValueError(
        "lawa_eval_params needs a state holding exactly one LawaState; got "
        f"{len(found)} in a {type(state).__name__}.")
  return found[0]


def lawa_eval_params(state: Any, params: optax.Params) -> optax.Params:
  """The params to evaluate: the mean of the last k LAWA checkpoints.

  Before the first checkpoint it returns `params` (the raw iterate).

  Args:
    state: the state of :func:`lawa` or a state that contains exactly one
      `LawaState` (e.g. inside `optax.chain` or `inject_hyperparams`).
    params: the current raw params (returned before the first checkpoint).

  Returns:
    A pytree like `params`, in the params' dtypes.

  Example::

    eval_params = gradax.optimizers.lawa_eval_params(state, params)
    metrics = task.metrics(eval_params, task.eval_batch())
  """
  s = _find_lawa_state(state)
  k = jax.tree.leaves(s.checkpoints)[0].shape[0]
  slot_used = jnp.arange(k) < s.num_filled  # slots fill 0..k-1 in order
  denom = jnp.maximum(s.num_filled, 1).astype(jnp.float32)

  def avg(buf, p):
    w = slot_used.astype(jnp.float32).reshape((k,) + (1,) * (buf.ndim - 1))
    mean = jnp.sum(buf.astype(jnp.float32) * w, axis=0) / denom
    return jnp.where(s.num_filled > 0, mean, p.astype(jnp.float32)).astype(
        jnp.asarray(p).dtype)

  return jax.tree.map(avg, s.checkpoints, params)


def lawa_adamw(
    learning_rate: optax.ScalarOrSchedule,
    num_checkpoints: int = 5,
    checkpoint_every: int = 100,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW that also keeps LAWA checkpoints (see :func:`lawa`).

  Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training
  with Latest Weight Averaging", 2022, arXiv 2209.14981.

  Args:
    learning_rate: a scalar or schedule.
    num_checkpoints: k >= 1.
    checkpoint_every: steps between checkpoints, >= 1.
    b1: AdamW's first-moment decay.
    b2: AdamW's second-moment decay.
    eps: AdamW's epsilon.
    weight_decay: AdamW's decoupled weight decay.
    mask: optional weight-decay mask.

  Returns:
    An `optax.GradientTransformationExtraArgs`; evaluate with
    :func:`lawa_eval_params`.

  Example::

    tx = gradax.optimizers.lawa_adamw(1e-3, num_checkpoints=5)
    updates, state = tx.update(grads, tx.init(params), params)
    eval_params = gradax.optimizers.lawa_eval_params(state, params)
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return lawa(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay, mask=mask),
      num_checkpoints=num_checkpoints, checkpoint_every=checkpoint_every)
