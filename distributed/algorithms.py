"""Registry of distributed training algorithms behind one interface.

Every entry of :data:`ALGORITHMS` is a builder

    builder(loss_fn, optimizer, mesh, **kwargs) -> TrainAlgorithm

and :func:`build` looks one up by name. A runner drives any of them the same
way::

    alg = gradax.distributed.algorithms.build(
        "diloco", task.loss, optax.adamw(1e-3), make_mesh("data=8"),
        sync_every=100, compressor="int8")
    state = alg.init(params)                  # placed on the mesh
    for t in range(steps):
      state, metrics = alg.step(state, global_batch(t))   # metrics["loss"]
    params = alg.eval_params(state)           # what to evaluate / checkpoint
    alg.bytes_per_step(params)                # per-device bytes per step

``TrainAlgorithm`` (see :mod:`gradax.distributed.data_parallel`) has fields
``name, init, step, eval_params, bytes_per_step, mesh, axis_name, round,
period``. ``step`` takes the *global* batch of one step (leading axis divisible
by the number of replicas; each replica trains on its slice). Local-update
algorithms also offer ``round(state, batches)`` running ``period`` = H steps as
one compiled program (``batches`` stacks H global batches).

Names and the meaning of ``optimizer``:

=================== ==========================================================
``data_parallel``   optimizer = the optimizer; kwargs ``reducer`` ("mean",
                    a compressor name such as "int8", a robust aggregator
                    such as "krum:1", or None when the optimizer communicates
                    itself via ``axis_name``), ``plan`` (ZeRO stage 0-3),
                    ``microbatches``.
``local_sgd``       optimizer = local optimizer; ``sync_every``.
``diloco``          optimizer = inner optimizer; ``sync_every``,
                    ``outer_optimizer``, ``compressor``.
``streaming_diloco`` as diloco plus ``num_fragments``, ``overlap_steps``,
                    ``alpha``.
``eager_diloco``    as diloco.
``co2``             optimizer = inner optimizer; ``sync_every``,
                    ``outer_learning_rate``, ``outer_momentum``,
                    ``gap_penalty``, ``clip_threshold``.
``demo``            optimizer ignored (DeMo is the optimizer); requires
                    ``learning_rate``; ``topk``, ``chunk``,
                    ``compression_decay``, ``weight_decay``.
``just_one_byte``   optimizer ignored (SPSA); requires ``learning_rate``;
                    ``eps``, ``clip``, ``seed``.
=================== ==========================================================

All take ``axis_name`` (default ``"data"``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from gradax.distributed import compressors as _comp
from gradax.distributed import robust as _robust
from gradax.distributed.co2 import co2
from gradax.distributed.data_parallel import TrainAlgorithm, data_parallel
from gradax.distributed.delayed_scaling import delayed_scaling_reducer
from gradax.distributed.demo import demo
from gradax.distributed.diloco import diloco
from gradax.distributed.eager_updates import eager_diloco
from gradax.distributed.just_one_byte import just_one_byte
from gradax.distributed.local_sgd import local_sgd
from gradax.distributed.streaming_diloco import streaming_diloco

COMPRESSORS = {
    "identity": _comp.identity,
    "bf16": lambda: _comp.cast("bf16"),
    "fp16": lambda: _comp.cast("fp16"),
    "int8": _comp.int8,
    # int8 codes with scales from the last mean (no scale bytes; a Reducer).
    "int8_delayed": delayed_scaling_reducer,
    "int4": lambda: _comp.int_quantize(4),
    "onebit": _comp.onebit,
}


def parse_compressor(spec: Any) -> Any:
  """A compressor (or, for ``int8_delayed``, a Reducer) from a name in
  :data:`COMPRESSORS`; objects pass through."""
  if spec is None or not isinstance(spec, str):
    return spec
  if spec not in COMPRESSORS:
    raise ValueError(
        f"compressor={spec!r}; known names: {', '.join(COMPRESSORS)}.")
  return COMPRESSORS[spec]()


def parse_reducer(spec: Any) -> Any:
  """``"mean"``, a compressor name, ``"<aggregator>[:f]"`` or an object.

  Aggregator names: ``coordinate_median``/``median``, ``trimmed_mean``,
  ``krum``, ``flag_aggregator``/``flag``; ``f`` is ``num_faulty``.
  """
  if not isinstance(spec, str) or spec == "mean":
    return spec
  name, _, f = spec.partition(":")
  aliases = {"median": "coordinate_median", "flag": "flag_aggregator"}
  name = aliases.get(name, name)
  if name in _robust.AGGREGATORS:
    try:
      num_faulty = int(f) if f else 0
    except ValueError:
      raise ValueError(
          f"reducer={spec!r}: the number of faulty workers after ':' must "
          "be an integer.") from None
    return _robust.AGGREGATORS[name](num_faulty)
  if name in COMPRESSORS:
    return parse_compressor(name)
  raise ValueError(
      f"reducer={spec!r}; allowed: 'mean', a compressor "
      f"({', '.join(COMPRESSORS)}), or an aggregator "
      f"({', '.join(_robust.AGGREGATORS)}) with an optional ':f'.")


def _needs_lr(name: str, kwargs: dict) -> float:
  if "learning_rate" not in kwargs:
    raise ValueError(f"algorithm {name!r} needs learning_rate=... .")
  return kwargs.pop("learning_rate")


def _data_parallel(loss_fn, optimizer, mesh, **kw):
  if "reducer" in kw:
    kw["reducer"] = parse_reducer(kw["reducer"])
  return data_parallel(loss_fn, optimizer, mesh, **kw)


def _with_compressor(fn):
  def builder(loss_fn, optimizer, mesh, **kw):
    if "compressor" in kw:
      kw["compressor"] = parse_compressor(kw["compressor"])
    return fn(loss_fn, optimizer, mesh, **kw)
  builder.__doc__ = fn.__doc__
  return builder


def _local_sgd(loss_fn, optimizer, mesh, **kw):
  if "reducer" in kw:
    kw["reducer"] = parse_reducer(kw["reducer"])
  return local_sgd(loss_fn, optimizer, mesh, **kw)


def _demo(loss_fn, optimizer, mesh, **kw):
  del optimizer
  return demo(loss_fn, _needs_lr("demo", kw), mesh, **kw)


def _just_one_byte(loss_fn, optimizer, mesh, **kw):
  del optimizer
  return just_one_byte(loss_fn, _needs_lr("just_one_byte", kw), mesh, **kw)


Builder = Callable[..., TrainAlgorithm]

ALGORITHMS: dict[str, Builder] = {
    "data_parallel": _data_parallel,
    "local_sgd": _local_sgd,
    "diloco": _with_compressor(diloco),
    "streaming_diloco": _with_compressor(streaming_diloco),
    "eager_diloco": _with_compressor(eager_diloco),
    "co2": _with_compressor(co2),
    "demo": _demo,
    "just_one_byte": _just_one_byte,
}


def build(name: str, loss_fn: Callable[[Any, Any], jax.Array],
          optimizer: optax.GradientTransformation | None, mesh: Mesh,
          **kwargs) -> TrainAlgorithm:
  """Builds the algorithm ``name`` (see the module docstring for kwargs).

  Args:
    name: a key of :data:`ALGORITHMS`.
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    optimizer: the (inner) optax optimizer; ignored by ``demo`` and
      ``just_one_byte``.
    mesh: a mesh with the replica axis (``axis_name``, default ``"data"``).
    **kwargs: algorithm options.

  Returns:
    A :class:`~gradax.distributed.data_parallel.TrainAlgorithm`.

  Raises:
    ValueError: for an unknown name or invalid options.

  Example:
    >>> alg = build("diloco", loss, optax.adamw(1e-3), make_mesh("data=8"),
    ...             sync_every=100, compressor="int8")
  """
  if name not in ALGORITHMS:
    raise ValueError(
        f"algorithm={name!r}; known algorithms: {', '.join(ALGORITHMS)}.")
  return ALGORITHMS[name](loss_fn, optimizer, mesh, **dict(kwargs))
