"""Small models with masked losses for federated simulation and tests.

A model is ``(init(key) -> params, apply(params, x) -> logits)``; ``masked_xent``
turns it into the loss the client machinery expects (a weighted mean over
``batch["mask"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Model(NamedTuple):
  init: Callable
  apply: Callable


def softmax_regression(dim: int, num_classes: int) -> Model:
  """Multinomial logistic regression (FedProx's MCLR), zero-initialised."""
  def init(key):
    del key
    return {"w": jnp.zeros((dim, num_classes)), "b": jnp.zeros((num_classes,))}

  def apply(params, x):
    return x @ params["w"] + params["b"]
  return Model(init, apply)


def mlp(sizes: Sequence[int]) -> Model:
  """ReLU MLP with LeCun-normal weights; ``sizes = (in, hidden..., out)``."""
  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"l{i}": {"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a),
                      "b": jnp.zeros((b,))}
            for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}

  def apply(params, x):
    n = len(sizes) - 1
    for i in range(n):
      x = x @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
      if i < n - 1:
        x = jax.nn.relu(x)
    return x
  return Model(init, apply)


def masked_xent(model: Model) -> Callable:
  """``loss(params, batch)``: Σ mask·xent / max(Σ mask, 1)."""
  def loss(params, batch):
    logits = model.apply(params, batch["x"])
    l = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    m = batch.get("mask", jnp.ones_like(l))
    return jnp.sum(l * m) / jnp.maximum(jnp.sum(m), 1.0)
  return loss


def accuracy(model: Model, params, x, y) -> jax.Array:
  """Fraction of ``argmax(logits) == y``."""
  return jnp.mean((jnp.argmax(model.apply(params, x), -1) == y)
                  .astype(jnp.float32))
