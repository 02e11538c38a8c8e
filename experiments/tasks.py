"""Built-in tasks: one small interface, registered in one place (``TASKS``).

A :class:`Task` bundles a model, its offline data and its metrics as pure
functions, so that the runner, tests, benchmarks and notebooks can train any
task with any optimizer::

  task = get_task("char_lm")                   # or get_task("char_lm", d_model=32)
  params = task.init(jax.random.key(0))        # nested dict of arrays
  batch = task.train_batch(step=0, batch_size=32, seed=0)
  loss = task.loss(params, batch)               # jittable scalar
  print(task.metrics(params, task.eval_batch()))  # {"loss": ..., "bpc": ...}

Tasks (all offline, all real):

* ``digits_mlp``: a 64-128-10 MLP on scikit-learn's bundled 8x8 digits
  (1,797 images). Fixed split: a seed-0 permutation; the last 360 images are
  the test set. Headline: test ``accuracy``.
* ``char_lm``: a small decoder-only transformer (flax ``nnx``) over the bytes of
  a fixed list of Python standard-library source files (``CHAR_LM_FILES``,
  read from ``os.path.dirname(os.__file__)``, so every machine with Python has
  them). The last 10% of the concatenated bytes is held out. Headline:
  ``bpc``, bits per character = mean next-byte cross-entropy in nats / ln 2.
  The exact numbers depend on the Python version whose library is read.
* ``quadratic``: ``f(x) = 1/2 sum_i h_i (x_i - c_i)^2`` with ``h`` log-spaced
  over ``[1, condition]`` (condition number 1e3 by default); minimum 0 at
  ``c``. Headline: ``suboptimality`` f(x) - f*.
* ``rosenbrock``: ``f = sum_i a(1 - x_i)^2 + b (x_{i+1} - x_i^2)^2`` started
  at the classic (-1.2, 1, -1.2, ...); minimum 0 at all-ones. Headline:
  ``suboptimality``.

Adding a task: write ``experiments/<name>.py`` with a factory
``make_<name>(**overrides) -> Task`` and add ONE line to ``TASKS`` below
(use ``lazy("gradax.experiments.<name>", "make_<name>")`` as the factory so the
module is imported only when the task is built), e.g.::

  "moe_lm": lazy("gradax.experiments.moe_lm", "make_moe_lm"),

``make_char_lm(ffn=...)`` builds the char_lm transformer with any feed-forward
block: ``ffn(d_model, rngs) -> nnx.Module`` whose ``__call__(x)`` returns
``(y, aux_loss)``; the task's loss adds the sum of the blocks' aux losses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Params = Any  # a nested dict of jnp arrays
Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Task:
  """A training problem as pure functions.

  Attributes:
    name: registry name.
    headline_metric: key of ``metrics`` that summarises quality ("accuracy",
      "bpc", "suboptimality").
    higher_is_better: whether larger headline values are better.
    init: ``init(rng) -> params``, a nested dict of arrays with string keys.
    loss: ``loss(params, batch) -> scalar``; jittable, differentiable in params.
    metrics: ``metrics(params, batch) -> dict[str, scalar]``; jittable; always
      contains "loss" and the headline metric.
    train_batch: ``train_batch(step, batch_size, seed) -> dict of np.ndarray``;
      a pure function of its arguments, so any worker can rebuild any batch.
      Leading dimension of every array is ``batch_size``.
    eval_batch: ``eval_batch() -> dict of np.ndarray``, a fixed held-out batch
      whose leading dimension is a multiple of 8 (so it shards over data=8).
  """

  name: str
  headline_metric: str
  higher_is_better: bool
  init: Callable[[jax.Array], Params]
  loss: Callable[[Params, Batch], jax.Array]
  metrics: Callable[[Params, Batch], dict[str, jax.Array]]
  train_batch: Callable[[int, int, int], dict[str, np.ndarray]]
  eval_batch: Callable[[], dict[str, np.ndarray]]


def _check_positive_int(name: str, value: Any, task: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(
        f"task {task!r}: {name}={value!r} is invalid; it must be a positive integer.")
  return int(value)


def _check_batch_size(batch_size: Any, task: str) -> int:
  return _check_positive_int("batch_size", batch_size, task)


def _step_rng(seed: int, step: int, salt: int) -> np.random.Generator:
  # Batches are a function of (seed, step) only: resume and multi-host rebuild them.
  return np.random.default_rng([int(salt), int(seed), int(step)])


def _check_overrides(task: str, overrides: Mapping[str, Any], allowed: Mapping[str, Any]):
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise ValueError(
        f"task {task!r}: unknown option {unknown[0]!r}; allowed options are "
        f"{', '.join(sorted(allowed))}.")
  return {**allowed, **overrides}


# ----------------------------------------------------------------------------
# digits_mlp
# ----------------------------------------------------------------------------

DIGITS_TEST_SIZE = 360


@functools.lru_cache(maxsize=None)
def _digits_split():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  train, test = perm[:-DIGITS_TEST_SIZE], perm[-DIGITS_TEST_SIZE:]
  return x[train], y[train], x[test], y[test]


def _xent_and_accuracy(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  acc = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.mean(nll), jnp.mean(acc)


def make_digits_mlp(**overrides) -> Task:
  """MLP classifier on scikit-learn's 8x8 digits (see module docstring).

  Options: ``hidden`` (width, default 128), ``depth`` (hidden layers, 1).
  """
  opts = _check_overrides("digits_mlp", overrides, {"hidden": 128, "depth": 1})
  hidden = _check_positive_int("hidden", opts["hidden"], "digits_mlp")
  depth = _check_positive_int("depth", opts["depth"], "digits_mlp")
  sizes = [64] + [hidden] * depth + [10]

  def init(rng):
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      rng, sub = jax.random.split(rng)
      params[f"layer{i}"] = {
          "w": jax.random.normal(sub, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in),
          "b": jnp.zeros((fan_out,), jnp.float32),
      }
    return params

  def apply(params, x):
    n = len(sizes) - 1
    for i in range(n):
      x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
      if i < n - 1:
        x = jax.nn.relu(x)
    return x

  def loss(params, batch):
    return _xent_and_accuracy(apply(params, batch["x"]), batch["y"])[0]

  def metrics(params, batch):
    nll, acc = _xent_and_accuracy(apply(params, batch["x"]), batch["y"])
    return {"loss": nll, "accuracy": acc}

  def train_batch(step, batch_size, seed):
    batch_size = _check_batch_size(batch_size, "digits_mlp")
    x, y, _, _ = _digits_split()
    idx = _step_rng(seed, step, 1).integers(0, len(x), size=batch_size)
    return {"x": x[idx], "y": y[idx]}

  def eval_batch():
    _, _, x, y = _digits_split()
    return {"x": x, "y": y}

  return Task("digits_mlp", "accuracy", True, init, loss, metrics, train_batch, eval_batch)


# ----------------------------------------------------------------------------
# char_lm
# ----------------------------------------------------------------------------

# Present in every CPython >= 3.11 as plain modules. Order matters (it fixes
# the held-out tail).
CHAR_LM_FILES = (
    "os.py",
    "functools.py",
    "dataclasses.py",
    "argparse.py",
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "random.py",
    "json/decoder.py",
    "json/encoder.py",
    "contextlib.py",
)
CHAR_LM_HOLDOUT = 0.1
CHAR_LM_VOCAB = 256
CHAR_LM_EVAL_WINDOWS = 64


@functools.lru_cache(maxsize=None)
def char_lm_corpus() -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(train_bytes, heldout_bytes)`` as uint8 arrays.

  The corpus is ``CHAR_LM_FILES`` under ``os.path.dirname(os.__file__)``,
  concatenated in order; the last ``CHAR_LM_HOLDOUT`` fraction is held out.
  """
  root = os.path.dirname(os.__file__)
  chunks = []
  for rel in CHAR_LM_FILES:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
      raise ValueError(
          f"char_lm corpus file {path!r} does not exist; the corpus is the "
          f"Python standard-library files {', '.join(CHAR_LM_FILES)}.")
    with open(path, "rb") as f:
      chunks.append(f.read())
  data = np.frombuffer(b"\n".join(chunks), dtype=np.uint8)
  cut = int(len(data) * (1.0 - CHAR_LM_HOLDOUT))
  return data[:cut], data[cut:]


class DenseFFN(nnx.Module):
  """Position-wise MLP (d -> 4d -> d, GELU); returns ``(y, 0.0)``."""

  def __init__(self, d_model: int, rngs: nnx.Rngs, mult: int = 4):
    self.up = nnx.Linear(d_model, mult * d_model, rngs=rngs)
    self.down = nnx.Linear(mult * d_model, d_model, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x))), jnp.zeros((), jnp.float32)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention."""

  def __init__(self, d_model: int, num_heads: int, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(
          f"char_lm: d_model={d_model} is not divisible by num_heads={num_heads}; "
          "d_model must be a multiple of num_heads.")
    self.num_heads = num_heads
    self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * h, d // h), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    att = jax.nn.softmax(logits, axis=-1)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block with a pluggable feed-forward module."""

  def __init__(self, d_model, num_heads, ffn, rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = CausalSelfAttention(d_model, num_heads, rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.ffn = ffn(d_model, rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    y, aux = self.ffn(self.ln2(x))
    return x + y, aux


class CharTransformer(nnx.Module):
  """Decoder-only byte-level transformer.

  ``__call__(tokens[b, t]) -> (logits[b, t, vocab], aux_loss)`` where
  ``aux_loss`` is the sum of the feed-forward blocks' auxiliary losses.
  """

  def __init__(self, *, vocab: int, d_model: int, num_layers: int, num_heads: int,
               seq_len: int, ffn: Callable[[int, nnx.Rngs], nnx.Module],
               rngs: nnx.Rngs):
    self.num_layers = num_layers
    self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d_model)))
    for i in range(num_layers):
      setattr(self, f"block{i}", Block(d_model, num_heads, ffn, rngs))
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    aux_total = jnp.zeros((), jnp.float32)
    for i in range(self.num_layers):
      x, aux = getattr(self, f"block{i}")(x)
      aux_total = aux_total + aux
    return self.head(self.ln_f(x)), aux_total


def _stringify_keys(tree):
  if isinstance(tree, Mapping):
    return {str(k): _stringify_keys(v) for k, v in tree.items()}
  return tree


def _unstringify_like(template, tree):
  # Params use string keys (orbax- and config-friendly); nnx wants its own keys.
  if isinstance(template, Mapping):
    return {k: _unstringify_like(v, tree[str(k)]) for k, v in template.items()}
  return tree


def make_char_lm(
    ffn: Callable[[int, nnx.Rngs], nnx.Module] = DenseFFN,
    name: str = "char_lm",
    *,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seq_len: int = 64,
    aux_weight: float = 1.0,
) -> Task:
  """Byte-level language model on Python standard-library sources.

  Args:
    ffn: feed-forward factory ``ffn(d_model, rngs) -> nnx.Module`` whose
      ``__call__(x)`` returns ``(y, aux_loss)``; ``DenseFFN`` by default. The
      MoE task passes an MoE layer here.
    name: the task's name.
    d_model, num_layers, num_heads, seq_len: transformer sizes.
    aux_weight: multiplier of the summed aux losses in ``loss``.

  Returns:
    A :class:`Task` with headline metric ``bpc`` (lower is better). ``metrics``
    also reports ``aux_loss`` and ``loss`` = cross-entropy (nats) + aux.
  """
  d_model = _check_positive_int("d_model", d_model, name)
  num_layers = _check_positive_int("num_layers", num_layers, name)
  num_heads = _check_positive_int("num_heads", num_heads, name)
  seq_len = _check_positive_int("seq_len", seq_len, name)
  if d_model % num_heads:
    raise ValueError(
        f"task {name!r}: d_model={d_model} is not divisible by num_heads="
        f"{num_heads}; d_model must be a multiple of num_heads.")

  def build(rng):
    return CharTransformer(vocab=CHAR_LM_VOCAB, d_model=d_model, num_layers=num_layers,
                           num_heads=num_heads, seq_len=seq_len, ffn=ffn,
                           rngs=nnx.Rngs(params=rng))

  # Structure only: the graph definition and the nnx key layout, no FLOPs.
  abstract = nnx.eval_shape(lambda: build(jax.random.key(0)))
  graphdef, abstract_state = nnx.split(abstract)
  template = nnx.to_pure_dict(abstract_state)

  def init(rng):
    _, state = nnx.split(build(rng))
    return _stringify_keys(nnx.to_pure_dict(state))

  def forward(params, tokens):
    model = nnx.merge(graphdef, _unstringify_like(template, params))
    return model(tokens)

  def _xent(params, batch):
    logits, aux = forward(params, batch["x"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["y"][..., None].astype(jnp.int32), axis=-1)
    return jnp.mean(nll), aux

  def loss(params, batch):
    nll, aux = _xent(params, batch)
    return nll + aux_weight * aux

  def metrics(params, batch):
    nll, aux = _xent(params, batch)
    return {"loss": nll + aux_weight * aux, "bpc": nll / math.log(2.0),
            "aux_loss": aux}

  def windows(data, starts):
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = data[idx].astype(np.int32)
    return {"x": w[:, :-1], "y": w[:, 1:]}

  def train_batch(step, batch_size, seed):
    batch_size = _check_batch_size(batch_size, name)
    train, _ = char_lm_corpus()
    starts = _step_rng(seed, step, 2).integers(0, len(train) - seq_len - 1, size=batch_size)
    return windows(train, starts)

  def eval_batch():
    _, held = char_lm_corpus()
    starts = np.linspace(0, len(held) - seq_len - 1, CHAR_LM_EVAL_WINDOWS).astype(np.int64)
    return windows(held, starts)

  return Task(name, "bpc", False, init, loss, metrics, train_batch, eval_batch)


# ----------------------------------------------------------------------------
# quadratic and rosenbrock
# ----------------------------------------------------------------------------


def make_quadratic(**overrides) -> Task:
  """Ill-conditioned quadratic ``1/2 sum_i h_i (x_i - c_i)^2`` (minimum 0 at c).

  Options: ``dim`` (default 16), ``condition`` (h from 1 to this, default 1e3),
  ``noise`` (std of additive gradient noise per example, default 0: exact).
  The batch holds per-example shifts ``xi``; the loss is the batch mean of
  ``1/2 sum_i h_i (x_i - c_i - xi_i)^2``, whose expectation differs from f by a
  constant, so the minimiser stays c.
  """
  opts = _check_overrides("quadratic", overrides, {"dim": 16, "condition": 1e3, "noise": 0.0})
  dim = _check_positive_int("dim", opts["dim"], "quadratic")
  condition, noise = float(opts["condition"]), float(opts["noise"])
  if not condition >= 1.0:
    raise ValueError(f"task 'quadratic': condition={condition!r} is invalid; it must be >= 1.")
  if not noise >= 0.0:
    raise ValueError(f"task 'quadratic': noise={noise!r} is invalid; it must be >= 0.")
  h = np.logspace(0.0, math.log10(condition), dim).astype(np.float32)
  center = np.random.default_rng(3).normal(size=dim).astype(np.float32)

  def f(params, shift):
    return 0.5 * jnp.sum(h * (params["x"] - center - shift) ** 2, axis=-1)

  def init(rng):
    del rng  # a fixed start, so optimizers are compared on the same problem
    return {"x": jnp.zeros((dim,), jnp.float32)}

  def loss(params, batch):
    return jnp.mean(f(params, batch["xi"]))

  def metrics(params, batch):
    return {"loss": loss(params, batch),
            "suboptimality": f(params, jnp.zeros((dim,), jnp.float32))}

  def train_batch(step, batch_size, seed):
    batch_size = _check_batch_size(batch_size, "quadratic")
    xi = noise * _step_rng(seed, step, 3).standard_normal((batch_size, dim))
    return {"xi": xi.astype(np.float32)}

  def eval_batch():
    return {"xi": np.zeros((8, dim), np.float32)}

  task = Task("quadratic", "suboptimality", False, init, loss, metrics, train_batch, eval_batch)
  return task


def make_rosenbrock(**overrides) -> Task:
  """Rosenbrock ``sum_i a(1 - x_i)^2 + b(x_{i+1} - x_i^2)^2`` (minimum 0 at 1).

  Options: ``dim`` (even, default 2), ``a`` (1.0), ``b`` (100.0). Deterministic:
  the batch carries only a dummy field so it can be sharded like any other.
  """
  opts = _check_overrides("rosenbrock", overrides, {"dim": 2, "a": 1.0, "b": 100.0})
  dim = _check_positive_int("dim", opts["dim"], "rosenbrock")
  if dim < 2:
    raise ValueError(f"task 'rosenbrock': dim={dim} is invalid; it must be >= 2.")
  a, b = float(opts["a"]), float(opts["b"])

  def f(x):
    return jnp.sum(a * (1.0 - x[:-1]) ** 2 + b * (x[1:] - x[:-1] ** 2) ** 2)

  def init(rng):
    del rng
    start = np.tile(np.array([-1.2, 1.0], np.float32), (dim + 1) // 2)[:dim]
    return {"x": jnp.asarray(start)}

  def loss(params, batch):
    # The batch is ignored except for its (zero) weight; keeps shapes uniform.
    return f(params["x"]) + 0.0 * jnp.sum(batch["dummy"])

  def metrics(params, batch):
    value = loss(params, batch)
    return {"loss": value, "suboptimality": value}

  def train_batch(step, batch_size, seed):
    del step, seed
    batch_size = _check_batch_size(batch_size, "rosenbrock")
    return {"dummy": np.zeros((batch_size,), np.float32)}

  def eval_batch():
    return {"dummy": np.zeros((8,), np.float32)}

  return Task("rosenbrock", "suboptimality", False, init, loss, metrics, train_batch, eval_batch)


def lazy(module: str, factory: str) -> Callable[..., Task]:
  """A registry entry that imports ``module`` only when the task is built."""

  def build(**overrides) -> Task:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(module), factory)(**overrides)

  return build


def _char_lm(**overrides) -> Task:
  opts = _check_overrides("char_lm", overrides, {
      "d_model": 64, "num_layers": 2, "num_heads": 4, "seq_len": 64, "aux_weight": 1.0})
  return make_char_lm(**opts)


# The registry: name -> factory(**overrides) -> Task. Add a task with ONE line.
TASKS: dict[str, Callable[..., Task]] = {
    "digits_mlp": make_digits_mlp,
    "char_lm": _char_lm,
    "quadratic": make_quadratic,
    "rosenbrock": make_rosenbrock,
    "moe_lm": lazy("gradax.experiments.moe_lm", "make_moe_lm"),
}


def get_task(name: str, **overrides) -> Task:
  """Builds a registered task.

  Args:
    name: a key of ``TASKS``.
    **overrides: task options (sizes etc.), see each factory's docstring.

  Returns:
    The :class:`Task`.

  Raises:
    ValueError: for an unknown name (listing the valid ones) or a bad option.

  Example:
    >>> task = get_task("quadratic", dim=4)
    >>> float(task.loss(task.init(jax.random.key(0)), task.eval_batch())) > 0
    True
  """
  if name not in TASKS:
    raise ValueError(
        f"unknown task {name!r}; valid tasks are {', '.join(sorted(TASKS))}.")
  return TASKS[name](**overrides)
