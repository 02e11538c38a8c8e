r"""The gradax experiment runner: ``python -m gradax.experiments.run``.

Trains a built-in task (``gradax.experiments.tasks``) with one or several
optimizers on a device mesh and compares them::

  python -m gradax.experiments.run --task=digits_mlp \
      --optimizer=adamw,sgd:momentum=0.9,shampoo:block_size=64:b2=0.99 \
      --steps=500 --batch_size=64 --mesh=data=8 --workdir=runs/digits

Optimizer specs: ``name[:key=value[:key=value...]]``; a comma separates the
optimizers of a comparison. ``name`` is looked up in ``gradax.optimizers``
first, then in ``optax``; it must be a factory whose first argument is
``learning_rate``. Values parse as int, float, ``true``/``false``, ``none``,
else string. ``learning_rate=`` inside a spec overrides every other source;
otherwise ``--learning_rate`` (if > 0), else the tuned table
``config.learning_rates[name][task]``, else ``config.default_learning_rate``.
Task specs take the same form: ``--task=char_lm:d_model=128:seq_len=128``.

Every field of ``experiments/configs/default.py`` can be set with
``--config.<field>=value``; the flags ``--task --optimizer --steps
--batch_size --learning_rate --seed --workdir --mesh`` override the config.

What a run does, per optimizer (``<workdir>/<label>/``):

* params and optimizer state are placed with ``NamedSharding`` on the mesh
  (replicated, or the last dimension over a ``model`` axis when it divides);
  the batch is sharded over ``data``; the step (``make_train_step``) is jitted;
* ``metrics.jsonl`` and TensorBoard events under ``tb/`` (train every
  ``log_every`` steps, eval every ``eval_every`` steps);
* orbax checkpoints every ``checkpoint_every`` steps in ``checkpoints/``; a
  rerun of the same command resumes from the newest good checkpoint, and the
  metrics that follow are identical to an uninterrupted run (batches are pure
  functions of the step). A corrupt or partial newest checkpoint is moved
  aside (``<step>.corrupt``) with a warning and the previous one is used;
* ``config.json`` fingerprints the configuration; a workdir holding a run of
  a different configuration is refused and never overwritten;
* ``batch_size_controller="adadagrad"`` (with ``adadagrad_eta`` and
  ``max_batch_size``) makes the global batch size adaptive (AdAdaGrad's norm
  test on per-example gradient statistics; ``batch_size`` is the initial
  size): sizes are rounded up to buckets ``batch_size * 2**k`` capped at
  ``max_batch_size`` (one compiled step per bucket, every bucket a multiple of
  the data axis), ``batch_size`` and ``norm_test_ratio`` are logged with the
  train metrics, and the controller state is checkpointed and resumed;
* an optimizer whose state holds a LAWA state (e.g. ``lawa_adamw``) is
  evaluated at LAWA's averaged params (``lawa_eval_params``);
* a run whose loss becomes non-finite stops and is marked ``diverged``; no
  NaN is ever checkpointed.

At the end it prints a summary table (also ``<workdir>/summary.md`` and
``summary.json``) and writes ``<workdir>/curves.png`` (train loss and eval
headline metric of every optimizer).

Communication bytes: an optimizer that communicates reports the bytes it sent
per device in its last update as a field named ``comm_bytes`` of any
NamedTuple in its state (see ``COMM_BYTES_FIELD``): a scalar, or an array with
a leading replica axis, which is averaged. The runner sums these
fields, logs them as ``comm_bytes`` and shows MB/step in the summary.

Multi-host: ``--coordinator_address=host:port --num_processes=N
--process_id=i`` call ``jax.distributed.initialize``; on TPU pods and SLURM
jobs with several tasks it is called without arguments (auto-detection). Each
process builds the same global batch and feeds its addressable shards.
Process 0 writes ``metrics.jsonl``; process i > 0 writes
``metrics.process<i>.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gradax.distributed import make_mesh
from gradax.experiments import tasks as tasks_lib
from gradax.optimizers import adadagrad
from gradax.optimizers.lawa import LawaState, lawa_eval_params

COMM_BYTES_FIELD = "comm_bytes"

# Optimizers that all-reduce (compressed) momentum themselves over the data
# axis. Without --algorithm they run in ``gradax.distributed``'s data-parallel
# step with ``reducer=None``, built with ``axis_name="data"``, so the runner
# reports the bytes they really send. (0/1 Adam is not here: its local steps
# need per-replica parameters, which that step does not keep.)
SELF_COMMUNICATING_OPTIMIZERS = ("onebit_adam", "onebit_lamb")

# Algorithms of ``gradax.distributed.algorithms`` that are optimizers
# themselves and take the learning rate directly.
_ALGORITHMS_WITH_LEARNING_RATE = ("demo", "just_one_byte")


class UsageError(ValueError):
  """A user mistake (bad flag, config or workdir); the CLI prints it as one line."""

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

# Checked for every optimizer (gradax and optax alike) before it is built:
# name -> (test, allowed range in words).
HYPERPARAMETER_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "> 0"),
    "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "b3": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": (lambda v: v >= 0, ">= 0"),
    "eps_root": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
}


# ----------------------------------------------------------------------------
# Specs and optimizers
# ----------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  if low == "none":
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_spec(spec: str, kind: str = "optimizer") -> tuple[str, dict[str, Any]]:
  """Parses ``"name:key=value:key=value"`` into ``(name, {key: value})``."""
  parts = [p.strip() for p in str(spec).strip().split(":")]
  name, overrides = parts[0], {}
  if not name:
    raise ValueError(f"{kind} spec {spec!r} has no name; expected 'name' or 'name:key=value'.")
  for part in parts[1:]:
    key, sep, value = part.partition("=")
    if not sep or not key.strip():
      raise ValueError(
          f"{kind} spec {spec!r}: {part!r} is not of the form key=value "
          "(for example 'adamw:b2=0.99').")
    overrides[key.strip()] = _parse_value(value.strip())
  return name, overrides


def _is_optimizer_factory(fn: Any) -> bool:
  if not callable(fn) or isinstance(fn, type):
    return False
  try:
    params = list(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return False
  return bool(params) and params[0] == "learning_rate"


def available_optimizers() -> dict[str, str]:
  """Optimizer names the runner accepts -> the module providing each."""
  from gradax import optimizers as gx  # pylint: disable=g-import-not-at-top
  found = {}
  for module, label in ((optax, "optax"), (gx, "gradax.optimizers")):
    for name in dir(module):
      if (not name.startswith(("_", "scale_by_"))
          and _is_optimizer_factory(getattr(module, name))):
        found[name] = label  # gradax wins over optax
  return found


def resolve_optimizer(name: str) -> Callable[..., optax.GradientTransformation]:
  """The factory for ``name``: ``gradax.optimizers`` first, then ``optax``."""
  from gradax import optimizers as gx  # pylint: disable=g-import-not-at-top
  for module in (gx, optax):
    fn = getattr(module, name, None)
    if not name.startswith("_") and _is_optimizer_factory(fn):
      return fn
  raise ValueError(
      f"unknown optimizer {name!r}; valid optimizers are "
      f"{', '.join(sorted(available_optimizers()))}.")


def _check_hyperparameter(opt: str, key: str, value: Any) -> None:
  if key not in HYPERPARAMETER_RANGES:
    return
  test, allowed = HYPERPARAMETER_RANGES[key]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not ok or not math.isfinite(value) or not test(value):
    raise ValueError(
        f"optimizer {opt!r}: hyperparameter {key}={value!r} is invalid; it must be {allowed}.")


def build_optimizer(name: str, learning_rate: float,
                    overrides: Mapping[str, Any]) -> optax.GradientTransformation:
  """Builds optimizer ``name`` with ``learning_rate`` and hyperparameter overrides.

  Raises:
    ValueError: unknown name (lists the valid ones), unknown hyperparameter
      (lists the accepted ones), or a value outside its allowed range.
  """
  fn = resolve_optimizer(name)
  sig = inspect.signature(fn)
  takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
  for key, value in overrides.items():
    if key not in sig.parameters and not takes_kwargs:
      accepted = [k for k in sig.parameters if k != "learning_rate"]
      raise ValueError(
          f"optimizer {name!r} has no hyperparameter {key!r}; its hyperparameters "
          f"are {', '.join(accepted) or '(none)'}.")
    _check_hyperparameter(name, key, value)
  _check_hyperparameter(name, "learning_rate", learning_rate)
  try:
    return fn(learning_rate=learning_rate, **overrides)
  except (ValueError, TypeError) as e:
    raise ValueError(f"optimizer {name!r}: {e}") from None


def resolve_learning_rate(config: Mapping[str, Any], name: str, task: str,
                          overrides: Mapping[str, Any]) -> tuple[float, str]:
  """Learning rate and where it came from (spec, flag, table or default)."""
  if "learning_rate" in overrides:
    return overrides["learning_rate"], "spec"
  if config.get("learning_rate") and config["learning_rate"] > 0:
    return float(config["learning_rate"]), "flag"
  table = config.get("learning_rates") or {}
  if name in table and task in table[name]:
    return float(table[name][task]), "table"
  return float(config.get("default_learning_rate", 1e-3)), "default"


def comm_bytes(opt_state: Any) -> jax.Array | None:
  """Sum of every ``comm_bytes`` field of NamedTuples in ``opt_state`` (or None)."""
  found = []

  def visit(node):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      for field in node._fields:
        value = getattr(node, field)
        if field == COMM_BYTES_FIELD:
          # A per-replica array (leading replica axis) is averaged over replicas.
          found.append(jnp.mean(jnp.asarray(value, jnp.float32)))
        else:
          visit(value)
    elif isinstance(node, (tuple, list)):
      for v in node:
        visit(v)
    elif isinstance(node, Mapping):
      for v in node.values():
        visit(v)

  visit(opt_state)
  return sum(found) if found else None


# ----------------------------------------------------------------------------
# Sharding and the train step
# ----------------------------------------------------------------------------


def leaf_sharding(mesh: jax.sharding.Mesh, shape: Sequence[int]) -> NamedSharding:
  """Params/optimizer-state rule: last dim over ``model`` if it divides, else replicated."""
  model = mesh.shape.get("model", 1)
  if model > 1 and len(shape) >= 2 and shape[-1] % model == 0:
    return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), "model"))
  return NamedSharding(mesh, P())


def tree_shardings(mesh, abstract_tree):
  return jax.tree.map(lambda x: leaf_sharding(mesh, x.shape), abstract_tree)


def batch_sharding(mesh, shape) -> NamedSharding:
  """Leading (batch) dim over ``data`` when it divides, else replicated."""
  data = mesh.shape.get("data", 1)
  if len(shape) >= 1 and shape[0] % data == 0:
    return NamedSharding(mesh, P("data"))
  return NamedSharding(mesh, P())


def to_global(batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]):
  """Global arrays from a host batch that every process holds in full."""
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), dict(shardings))  # C++ fast path
  return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
          for k, v in batch.items()}


# ----------------------------------------------------------------------------
# Adaptive batch size (AdAdaGrad)
# ----------------------------------------------------------------------------

BATCH_SIZE_CONTROLLERS = ("adadagrad",)


def batch_size_buckets(initial: int, max_batch_size: int) -> tuple[int, ...]:
  """The global batch sizes an adaptive run may use: ``initial * 2**k``, then the cap.

  ``initial`` and ``max_batch_size`` are multiples of the data axis, so every
  bucket is; powers of two keep the compiled programs to
  ``ceil(log2(max / initial)) + 1``.
  """
  sizes = [initial]
  while sizes[-1] * 2 < max_batch_size:
    sizes.append(sizes[-1] * 2)
  if sizes[-1] < max_batch_size:
    sizes.append(max_batch_size)
  return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class BatchSizeControl:
  """An adaptive global batch size: the controller, its size buckets, its shardings.

  ``config.batch_size_controller="adadagrad"`` turns it on: ``batch_size`` is
  the initial global batch size, ``adadagrad_eta`` the norm test's tolerance
  and ``max_batch_size`` the cap. After each step the controller's size is
  rounded UP to the next bucket of ``batch_size_buckets`` (so the batch
  never shrinks below what the norm test asked for, and the next batch holds
  a multiple of the data axis); that rounded size is what the controller
  state keeps, checkpoints and restores.
  """

  controller: Any       # gradax.optimizers.BatchSizeController
  buckets: tuple[int, ...]
  shardings: Any        # of the controller state (replicated scalars)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], mesh) -> "BatchSizeControl | None":
    if not cfg.get("batch_size_controller"):
      return None
    max_bs = int(cfg["max_batch_size"])
    controller = adadagrad.adadagrad_controller(
        eta=float(cfg["adadagrad_eta"]), max_batch_size=max_bs)
    abstract = jax.eval_shape(lambda: controller.init(int(cfg["batch_size"])))
    return cls(controller, batch_size_buckets(int(cfg["batch_size"]), max_bs),
               tree_shardings(mesh, abstract))

  def init(self, batch_size: int):
    return jax.device_put(self.controller.init(batch_size), self.shardings)

  def fingerprint(self, cfg: Mapping[str, Any]) -> str:
    return (f"{cfg['batch_size_controller']}:eta={float(cfg['adadagrad_eta'])}"
            f":max_batch_size={int(cfg['max_batch_size'])}")


def _validate_batch_size_control(cfg: Mapping[str, Any], mesh, names: Sequence[str]) -> None:
  kind = cfg.get("batch_size_controller") or ""
  if not kind:
    return
  if kind not in BATCH_SIZE_CONTROLLERS:
    raise ValueError(
        f"batch_size_controller={kind!r} is invalid; it must be '' (a fixed batch size) "
        f"or one of {', '.join(BATCH_SIZE_CONTROLLERS)}.")
  data = mesh.shape.get("data", 1)
  bs, max_bs, eta = cfg["batch_size"], cfg.get("max_batch_size"), cfg.get("adadagrad_eta")
  if bs < 2:
    raise ValueError(f"batch_size={bs} is invalid with batch_size_controller={kind!r}; "
                     "the norm test needs an initial batch size >= 2.")
  if (isinstance(max_bs, bool) or not isinstance(max_bs, int) or max_bs < bs
      or max_bs % data):
    raise ValueError(
        f"max_batch_size={max_bs!r} is invalid; with batch_size_controller={kind!r} it must be "
        f"an integer >= batch_size={bs} and a multiple of the mesh's data axis (size {data}).")
  if (isinstance(eta, bool) or not isinstance(eta, (int, float))
      or not math.isfinite(eta) or eta <= 0):
    raise ValueError(f"adadagrad_eta={eta!r} is invalid; it must be > 0.")
  if cfg.get("algorithm") or any(uses_self_communication(n, mesh) for n in names):
    raise ValueError(
        f"batch_size_controller={kind!r} works with the runner's own data-parallel step only; "
        f"it cannot be combined with --algorithm={cfg.get('algorithm')!r} or with "
        f"{', '.join(SELF_COMMUNICATING_OPTIMIZERS)}.")


def lawa_params_fn(abstract_opt_state) -> Callable[[Any, Any], Any] | None:
  """``(params, opt_state) -> eval params`` for a state holding a LAWA state, else None.

  LAWA (``gradax.optimizers.lawa``) trains the raw iterate but is evaluated at
  the mean of its last k checkpoints (``lawa_eval_params``).
  """
  found = [x for x in jax.tree.leaves(
      abstract_opt_state, is_leaf=lambda x: isinstance(x, LawaState))
           if isinstance(x, LawaState)]
  if len(found) != 1:
    return None
  return lambda params, opt_state: lawa_eval_params(opt_state, params)


def make_train_step(task: tasks_lib.Task, tx: optax.GradientTransformation,
                    param_shardings, opt_shardings, batch_shardings,
                    batch_control: BatchSizeControl | None = None):
  """The jitted step ``(params, opt_state, batch) -> (params, opt_state, metrics)``.

  The only place the runner builds its step; a different step builder (e.g.
  from ``gradax.distributed``) can replace this function.

  With ``batch_control`` the step is ``(params, opt_state, ctrl_state, batch)
  -> (params, opt_state, ctrl_state, metrics)``: the gradient comes from
  per-example gradients (``per_example_grad_stats``), whose statistics update
  the batch-size controller, and ``ctrl_state.batch_size`` becomes the next
  step's global batch size, rounded up to a bucket (see ``BatchSizeControl``).
  One program is compiled per bucket (jit's shape cache), not per size.
  """
  extra_args = isinstance(tx, optax.GradientTransformationExtraArgs)

  def apply(params, opt_state, batch, loss, grads):
    if extra_args:
      # value/obj_fn: for optimizers that use the loss (e.g. OASIS, optax's sophia).
      updates, opt_state = tx.update(grads, opt_state, params, value=loss,
                                     obj_fn=lambda p: task.loss(p, batch))
    else:
      updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    sent = comm_bytes(opt_state)
    if sent is not None:
      metrics[COMM_BYTES_FIELD] = sent
    return params, opt_state, metrics

  if batch_control is None:
    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(task.loss)(params, batch)
      return apply(params, opt_state, batch, loss, grads)

    return jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_shardings),
                   out_shardings=(param_shardings, opt_shardings, None))

  buckets = jnp.asarray(batch_control.buckets, jnp.int32)

  def adaptive_step(params, opt_state, ctrl_state, batch):
    loss, stats = adadagrad.per_example_grad_stats(task.loss, params, batch)
    params, opt_state, metrics = apply(params, opt_state, batch, loss, stats.grad)
    ctrl_state = batch_control.controller.update(ctrl_state, stats)
    # The smallest bucket >= the controller's size (the last bucket is the cap).
    index = jnp.minimum(jnp.searchsorted(buckets, ctrl_state.batch_size), len(buckets) - 1)
    ctrl_state = ctrl_state._replace(batch_size=buckets[index])
    metrics.update(batch_size=stats.batch_size, norm_test_ratio=ctrl_state.last_ratio)
    return params, opt_state, ctrl_state, metrics

  ctrl_shardings = batch_control.shardings
  return jax.jit(
      adaptive_step,
      in_shardings=(param_shardings, opt_shardings, ctrl_shardings, batch_shardings),
      out_shardings=(param_shardings, opt_shardings, ctrl_shardings, None))


# ----------------------------------------------------------------------------
# Workdir: fingerprint, checkpoints, metrics
# ----------------------------------------------------------------------------


def build_algorithm(spec: str, opt_name: str, task: tasks_lib.Task,
                    tx: optax.GradientTransformation, learning_rate: float, mesh):
  """A ``gradax.distributed`` TrainAlgorithm for ``--algorithm``, or None.

  ``spec`` is ``name[:key=value...]`` over ``gradax.distributed.ALGORITHMS``
  (e.g. ``diloco:sync_every=20:compressor=int8``); empty means the runner's
  own jitted step, except for ``SELF_COMMUNICATING_OPTIMIZERS``, which get the
  data-parallel step with ``reducer=None``.
  """
  from gradax.distributed import algorithms  # pylint: disable=g-import-not-at-top
  if spec:
    name, kwargs = parse_spec(spec, kind="algorithm")
  elif uses_self_communication(opt_name, mesh):
    name, kwargs = "data_parallel", {"reducer": None}
  else:
    return None
  if name in _ALGORITHMS_WITH_LEARNING_RATE:
    kwargs.setdefault("learning_rate", learning_rate)
  return algorithms.build(name, task.loss, tx, mesh, **kwargs)


def uses_self_communication(opt_name: str, mesh) -> bool:
  return opt_name in SELF_COMMUNICATING_OPTIMIZERS and "data" in mesh.shape


def _label_dir(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", label)


def check_fingerprint(run_dir: str, fingerprint: dict, write: bool) -> None:
  """Refuses a run dir that holds a different configuration; records ours."""
  path = os.path.join(run_dir, "config.json")
  digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("sha256") != digest:
      old = saved.get("config", {})
      diff = [f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}"
              for k in sorted(set(old) | set(fingerprint)) if old.get(k) != fingerprint.get(k)]
      raise UsageError(
          f"workdir {run_dir!r} holds a run with a different configuration "
          f"({'; '.join(diff) or 'unknown difference'}); refusing to overwrite it: "
          "use another --workdir or delete that folder.")
    return
  if os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(
      os.path.join(run_dir, "checkpoints")):
    raise UsageError(
        f"workdir {run_dir!r} holds checkpoints but no config.json, so its configuration "
        "is unknown; refusing to overwrite it: use another --workdir or delete that folder.")
  if write:
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump({"sha256": digest, "config": fingerprint}, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


class Checkpoints:
  """orbax CheckpointManager over the flat list of the training state's leaves."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._open()

  def _open(self):
    ocp = self._ocp
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))

  @staticmethod
  def _flat(leaves):
    # orbax cannot store zero-size arrays; those are rebuilt from their shape.
    return {f"{i:05d}": x for i, x in enumerate(leaves) if math.prod(x.shape) > 0}

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=self._ocp.args.StandardSave(self._flat(jax.tree.leaves(state))))

  @staticmethod
  def _empty(want):
    return jax.make_array_from_callback(
        want.shape, want.sharding, lambda idx: np.zeros(want.shape, want.dtype)[idx])

  def restore_latest(self, abstract_state) -> tuple[int, Any]:
    """Newest readable checkpoint as ``(step, state)``; ``(0, None)`` if none.

    Unreadable ones (corrupt, partial, wrong shapes, non-finite) are moved to
    ``<step>.corrupt`` with a warning and the next older one is tried.
    """
    leaves, treedef = jax.tree.flatten(abstract_state)
    target = self._flat(leaves)
    while True:
      steps = sorted(self.manager.all_steps(), reverse=True)
      if not steps:
        return 0, None
      step = steps[0]
      try:
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
        values = [restored[f"{i:05d}"] if f"{i:05d}" in target else self._empty(want)
                  for i, want in enumerate(leaves)]
        for v, want in zip(values, leaves):
          if v.shape != want.shape or v.dtype != want.dtype:
            raise ValueError(f"leaf has shape {v.shape} {v.dtype}, expected {want.shape} {want.dtype}")
        if not bool(_host(all_finite(values))):
          raise ValueError("it holds non-finite values")
        return step, jax.tree.unflatten(treedef, values)
      except Exception as e:  # pylint: disable=broad-except
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        older = [s for s in steps[1:]]
        warnings.warn(
            f"checkpoint at step {step} in {self.directory} is corrupt or partial "
            f"({type(e).__name__}: {msg}); "
            + (f"falling back to step {older[0]}." if older else "starting from scratch."),
            RuntimeWarning, stacklevel=2)
        if jax.process_index() == 0:
          src = os.path.join(self.directory, str(step))
          dst = f"{src}.corrupt"
          n = 1
          while os.path.exists(dst):
            n, dst = n + 1, f"{src}.corrupt{n + 1}"
          shutil.move(src, dst)
        _sync("gradax_ckpt_fallback")
        self.manager.close()
        self._open()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _sync(name: str) -> None:
  """Barrier over processes (coordination service; no device collective)."""
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
    multihost.sync_global_processes(name)


@jax.jit
def all_finite(tree) -> jax.Array:
  """True iff every float leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _host(x) -> float:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_shards[0].data
  return float(np.asarray(x))


def _read_jsonl(path: str, upto_step: int) -> list[dict]:
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        break  # a line cut by a kill: everything after it is rewritten
      if rec.get("step", 0) <= upto_step:
        records.append(rec)
  return records


# ----------------------------------------------------------------------------
# Training one optimizer
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  label: str
  learning_rate: float
  steps_done: int
  status: str                     # "ok", "diverged", "stopped"
  records: list[dict]
  wall_seconds: float


def _progress_bar(total, initial, label, enabled):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True,
              disable=not enabled, leave=True, file=sys.stderr)


def train_one(cfg: Mapping[str, Any], task: tasks_lib.Task, task_spec: str, mesh,
              label: str, name: str, overrides: Mapping[str, Any]) -> RunResult:
  """Trains ``task`` with one optimizer spec; resumes from its workdir."""
  lr, lr_source = resolve_learning_rate(cfg, name, task.name, overrides)
  if lr_source == "default":
    warnings.warn(
        f"no tuned learning rate for optimizer {name!r} on task {task.name!r}; using "
        f"default_learning_rate={lr} (add a line to LEARNING_RATES in "
        "experiments/configs/default.py).", RuntimeWarning, stacklevel=2)
  opt_kwargs = {k: v for k, v in overrides.items() if k != "learning_rate"}
  algorithm = str(cfg.get("algorithm") or "")
  if not algorithm and uses_self_communication(name, mesh):
    opt_kwargs.setdefault("axis_name", "data")
  tx = build_optimizer(name, lr, opt_kwargs)
  alg = build_algorithm(algorithm, name, task, tx, lr, mesh)
  steps, batch_size, seed = int(cfg["steps"]), int(cfg["batch_size"]), int(cfg["seed"])
  proc = jax.process_index()
  run_dir = os.path.join(cfg["workdir"], _label_dir(label))
  fingerprint = {"task": task_spec, "optimizer": label, "learning_rate": lr,
                 "steps": steps, "batch_size": batch_size, "seed": seed,
                 "mesh": dict(mesh.shape)}
  if algorithm:
    fingerprint["algorithm"] = algorithm
  control = BatchSizeControl.from_config(cfg, mesh)
  if control is not None:
    fingerprint["batch_size_controller"] = control.fingerprint(cfg)
  check_fingerprint(run_dir, fingerprint, write=proc == 0)
  _sync("gradax_fingerprint")

  rng = jax.random.key(seed)
  abstract_params = jax.eval_shape(task.init, rng)
  param_sh = tree_shardings(mesh, abstract_params)
  if alg is None:
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = tree_shardings(mesh, abstract_opt)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        (abstract_params, abstract_opt), (param_sh, opt_sh))
    if control is not None:  # the controller state is checkpointed with the rest
      abstract_state += (jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          jax.eval_shape(lambda: control.controller.init(batch_size)), control.shardings),)

    def init_state():
      params = jax.jit(task.init, out_shardings=param_sh)(rng)
      state = (params, jax.jit(tx.init, out_shardings=opt_sh)(params))
      return state if control is None else state + (control.init(batch_size),)
  else:
    # The algorithm places its own state (per-replica axes, ZeRO shards); its
    # concrete initial state also gives the checkpoint restore target.
    initial_state = alg.init(jax.jit(task.init, out_shardings=param_sh)(rng))
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        initial_state)

    def init_state():
      return initial_state
  sample = task.train_batch(0, batch_size, seed)
  batch_sh = {k: batch_sharding(mesh, v.shape) for k, v in sample.items()}
  eval_np = task.eval_batch()
  eval_sh = {k: batch_sharding(mesh, v.shape) for k, v in eval_np.items()}

  ckpt = None
  start = 0
  state = None
  if cfg["checkpoint_every"] > 0:
    ckpt = Checkpoints(os.path.join(run_dir, "checkpoints"), max(2, int(cfg["keep_checkpoints"])))
    start, state = ckpt.restore_latest(abstract_state)
  if state is None:
    state = init_state()

  metrics_name = "metrics.jsonl" if proc == 0 else f"metrics.process{proc}.jsonl"
  metrics_path = os.path.join(run_dir, metrics_name)
  records = _read_jsonl(metrics_path, start)
  os.makedirs(run_dir, exist_ok=True)
  with open(metrics_path + ".tmp", "w") as f:  # drop what a killed run wrote past `start`
    f.writelines(json.dumps(r) + "\n" for r in records)
  os.replace(metrics_path + ".tmp", metrics_path)
  diverged = any(r.get("status") == "diverged" for r in records)

  writer = None
  if proc == 0:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start if start else None)
  if alg is None:
    plain_step = make_train_step(task, tx, param_sh, opt_sh, batch_sh, control)

    def train_step(state, batch):
      *state, m = plain_step(*state, batch)
      return tuple(state), m

    lawa_params = lawa_params_fn(abstract_opt)
    if lawa_params is None:
      def eval_params(state):
        return state[0]
    else:
      lawa_params = jax.jit(lawa_params, in_shardings=(param_sh, opt_sh),
                            out_shardings=param_sh)

      def eval_params(state):
        return lawa_params(state[0], state[1])
  else:
    bytes_per_step = float(alg.bytes_per_step(abstract_params))

    def train_step(state, batch):
      state, m = alg.step(state, batch)
      sent = comm_bytes(state)
      if sent is not None:
        m = {**m, COMM_BYTES_FIELD: sent}
      elif math.isfinite(bytes_per_step):
        m = {**m, COMM_BYTES_FIELD: bytes_per_step}
      return state, m

    def eval_params(state):
      return jax.device_put(alg.eval_params(state), param_sh)
  eval_fn = jax.jit(task.metrics, in_shardings=(param_sh, eval_sh))
  eval_batch = to_global(eval_np, eval_sh)
  log_every = max(1, int(cfg["log_every"]))
  eval_every, ckpt_every = int(cfg["eval_every"]), int(cfg["checkpoint_every"])
  stop_after = int(cfg.get("stop_after_step", 0) or 0)

  out = open(metrics_path, "a")

  def emit(record):
    records.append(record)
    out.write(json.dumps(record) + "\n")
    out.flush()
    if writer is not None:
      for k, v in record.items():
        if k not in ("step", "split", "status") and isinstance(v, (int, float)):
          writer.add_scalar(f"{record['split']}/{k}", v, record["step"])

  def evaluate(step):
    m = {k: _host(v) for k, v in eval_fn(eval_params(state), eval_batch).items()}
    emit({"step": step, "split": "eval", **m})

  bar = _progress_bar(steps, start, label, bool(cfg.get("progress", True)) and proc == 0)
  t_start = time.perf_counter()
  t_window, window_start = t_start, start
  status = "ok"
  if start == 0 and eval_every > 0 and not records:
    evaluate(0)
  step = start
  try:
    while step < steps and not diverged:
      if control is not None:  # the size the controller chose after the last step
        batch_size = int(adadagrad.batch_size_for_next_step(state[2]))
      batch = to_global(task.train_batch(step, batch_size, seed), batch_sh)
      state, m = train_step(state, batch)
      step += 1
      if step % log_every == 0 or step == steps:
        host = {k: _host(v) for k, v in m.items()}
        if "batch_size" in host:  # adaptive batch size: the global batch of this step
          host["batch_size"] = int(host["batch_size"])
        now = time.perf_counter()
        rate = (step - window_start) / max(now - t_window, 1e-9)
        t_window, window_start = now, step
        record = {"step": step, "split": "train", **host, "steps_per_sec": rate}
        if not math.isfinite(host["loss"]):
          record["status"] = "diverged"
          emit(record)
          diverged = True
          break
        emit(record)
        bar.set_postfix(loss=f"{host['loss']:.4f}", refresh=False)
        bar.update(step - bar.n)
      if eval_every > 0 and (step % eval_every == 0 or step == steps):
        evaluate(step)
      if ckpt is not None and (step % ckpt_every == 0 or step == steps):
        if not bool(_host(all_finite(state))):
          # Never checkpoint NaN/inf: stop here, the last good checkpoint stays.
          emit({"step": step, "split": "train", "loss": float("nan"), "status": "diverged"})
          diverged = True
          break
        ckpt.save(step, state)
      if stop_after and step >= stop_after and step < steps:
        status = "stopped"
        break
  finally:
    bar.close()
    out.close()
    if writer is not None:
      writer.close()
    if ckpt is not None:
      ckpt.close()
  if diverged:
    status = "diverged"
  return RunResult(label, lr, step, status, records, time.perf_counter() - t_start)


# ----------------------------------------------------------------------------
# Comparison, summary, plot
# ----------------------------------------------------------------------------


def summarize(task: tasks_lib.Task, results: Sequence[RunResult]) -> list[dict]:
  """One row per optimizer: final/best metrics, speed, bytes, status."""
  head = task.headline_metric
  rows = []
  for r in results:
    train = [x for x in r.records if x["split"] == "train"]
    evals = [x for x in r.records if x["split"] == "eval" and head in x]
    timed = [x["steps_per_sec"] for x in train if "steps_per_sec" in x]
    rates = timed[1:] or timed  # the first window includes compilation
    best = None
    if evals:
      vals = [x[head] for x in evals if math.isfinite(x[head])]
      if vals:
        best = max(vals) if task.higher_is_better else min(vals)
    row = {
        "optimizer": r.label,
        "lr": r.learning_rate,
        "steps": r.steps_done,
        "train_loss": train[-1]["loss"] if train else float("nan"),
        "eval_loss": evals[-1]["loss"] if evals else float("nan"),
        f"eval_{head}": evals[-1][head] if evals else float("nan"),
        f"best_{head}": best if best is not None else float("nan"),
        "steps_per_sec": float(np.median(rates)) if rates else float("nan"),
        "comm_MB_per_step": (train[-1][COMM_BYTES_FIELD] / 1e6
                             if train and COMM_BYTES_FIELD in train[-1] else None),
        "status": r.status,
    }
    rows.append(row)
  if all(row["comm_MB_per_step"] is None for row in rows):
    for row in rows:
      del row["comm_MB_per_step"]
  return rows


def format_table(rows: Sequence[dict]) -> str:
  """Plain-text table (also valid markdown)."""
  if not rows:
    return ""
  keys = list(rows[0])

  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  cells = [[fmt(row[k]) for k in keys] for row in rows]
  widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
  line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
  return "\n".join([line(keys), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                    *(line(c) for c in cells)]) + "\n"


def plot_curves(task: tasks_lib.Task, results: Sequence[RunResult], path: str) -> None:
  """Train loss and eval headline metric vs step, one line per optimizer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
  head = task.headline_metric
  for r in results:
    train = [x for x in r.records if x["split"] == "train"]
    evals = [x for x in r.records if x["split"] == "eval" and head in x]
    ax_train.plot([x["step"] for x in train], [x["loss"] for x in train], label=r.label)
    ax_eval.plot([x["step"] for x in evals], [x[head] for x in evals], marker="o",
                 markersize=3, label=r.label)
  ax_train.set(title=f"{task.name}: train loss", xlabel="step", ylabel="loss")
  ax_eval.set(title=f"{task.name}: eval {head}", xlabel="step", ylabel=head)
  if task.headline_metric == "suboptimality":
    ax_eval.set_yscale("log")
  for ax in (ax_train, ax_eval):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _as_dict(config) -> dict:
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return dict(config)


def default_config() -> dict:
  """The fields of ``experiments/configs/default.py`` as a plain dict."""
  from gradax.experiments.configs import default  # pylint: disable=g-import-not-at-top
  return default.get_config().to_dict()


def run_experiment(config) -> list[dict]:
  """Runs a (comparison) experiment described by ``config``; returns summary rows.

  Args:
    config: a ConfigDict or mapping with the fields of
      ``experiments/configs/default.py`` (missing fields take its defaults).

  Returns:
    The summary rows (one per optimizer), also written to the workdir.

  Raises:
    ValueError: for any bad input (unknown task/optimizer, mesh/device
      mismatch, batch size, hyperparameters, workdir of another config).
  """
  try:
    cfg, task, mesh, parsed = _validate(config)
  except UsageError:
    raise
  except ValueError as e:
    raise UsageError(str(e)) from e
  results = [train_one(cfg, task, cfg["task"], mesh, label, name, overrides)
             for label, name, overrides in parsed]
  return _report(cfg, task, mesh, results)


def _validate(config):
  """Checks the whole configuration before anything is trained or written."""
  cfg = {**default_config(), **_as_dict(config)}
  lr = cfg.get("learning_rate") or 0.0
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
    raise ValueError(
        f"learning_rate={lr!r} is invalid; it must be > 0 (or 0 to use the tuned table).")
  task_name, task_overrides = parse_spec(cfg["task"], kind="task")
  task = tasks_lib.get_task(task_name, **task_overrides)
  specs = [s.strip() for s in str(cfg["optimizers"]).split(",") if s.strip()]
  if not specs:
    raise ValueError("no optimizer given; pass e.g. --optimizer=adamw.")
  for key in ("steps", "batch_size"):
    if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(f"{key}={cfg[key]!r} is invalid; it must be a positive integer.")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 0:
      raise ValueError(f"{key}={cfg[key]!r} is invalid; it must be an integer >= 0.")
  mesh = make_mesh(cfg["mesh"], axis_type=jax.sharding.AxisType.Auto)
  data = mesh.shape.get("data", 1)
  if cfg["batch_size"] % data:
    raise ValueError(
        f"batch_size={cfg['batch_size']} is not divisible by the mesh's data axis "
        f"(size {data}); use a multiple of {data}.")

  if cfg.get("algorithm"):
    from gradax.distributed import algorithms  # pylint: disable=g-import-not-at-top
    alg_name, _ = parse_spec(cfg["algorithm"], kind="algorithm")
    if alg_name not in algorithms.ALGORITHMS:
      raise ValueError(
          f"unknown algorithm {alg_name!r}; valid algorithms are "
          f"{', '.join(sorted(algorithms.ALGORITHMS))}.")
    if "data" not in mesh.shape:
      raise ValueError(f"--algorithm={cfg['algorithm']!r} needs a 'data' mesh axis; "
                       f"the mesh is {dict(mesh.shape)}.")

  # Validate every spec before training anything.
  parsed, seen = [], set()
  for spec in specs:
    name, overrides = parse_spec(spec)
    label = spec if not overrides else name + ":" + ":".join(
        f"{k}={v}" for k, v in overrides.items())
    if label in seen:
      warnings.warn(f"optimizer {label!r} is listed twice; running it once.", RuntimeWarning)
      continue
    seen.add(label)
    lr, _ = resolve_learning_rate(cfg, name, task.name, overrides)
    build_optimizer(name, lr, {k: v for k, v in overrides.items() if k != "learning_rate"})
    parsed.append((label, name, overrides))
  _validate_batch_size_control(cfg, mesh, [name for _, name, _ in parsed])
  return cfg, task, mesh, parsed


def _report(cfg, task, mesh, results):
  """Summary table, summary.md/json and curves.png (process 0)."""
  rows = summarize(task, results)
  if jax.process_index() == 0:
    os.makedirs(cfg["workdir"], exist_ok=True)
    table = format_table(rows)
    with open(os.path.join(cfg["workdir"], "summary.md"), "w") as f:
      f.write(f"# {task.name}: {len(rows)} optimizer(s), mesh {dict(mesh.shape)}\n\n{table}")
    with open(os.path.join(cfg["workdir"], "summary.json"), "w") as f:
      json.dump(rows, f, indent=2)
    plot_curves(task, results, os.path.join(cfg["workdir"], "curves.png"))
    print(f"\n{task.name} (mesh {dict(mesh.shape)}, {cfg['steps']} steps, "
          f"batch {cfg['batch_size']}):\n{table}"
          f"plot: {os.path.join(cfg['workdir'], 'curves.png')}", flush=True)
  return rows


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                  "Python config file; override fields with --config.key=value.")
  flags.DEFINE_string("task", None, "Task spec, e.g. char_lm or char_lm:d_model=128.")
  flags.DEFINE_string("optimizer", None,
                      "Comma-separated optimizer specs, e.g. adamw,shampoo:block_size=64:b2=0.99.")
  flags.DEFINE_integer("steps", None, "Training steps per optimizer.")
  flags.DEFINE_integer("batch_size", None, "Global batch size (a multiple of the data axis).")
  flags.DEFINE_float("learning_rate", None, "Learning rate for every optimizer (> 0).")
  flags.DEFINE_integer("seed", None, "Seed of init and batches.")
  flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, plot).")
  flags.DEFINE_string("mesh", None, "Mesh spec, e.g. data=8 or data=4,model=2.")
  flags.DEFINE_string("algorithm", None,
                      "Distributed algorithm spec from gradax.distributed.ALGORITHMS, e.g. "
                      "diloco:sync_every=20:compressor=int8 (default: plain data parallel).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  return flags.FLAGS


def _auto_multihost() -> bool:
  """True inside a multi-task SLURM job or on a multi-worker TPU slice."""
  env = os.environ
  slurm_tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
  if "SLURM_JOB_ID" in env and slurm_tasks.isdigit() and int(slurm_tasks) > 1:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def _init_platform(cfg: dict, flags) -> None:
  if cfg.get("num_cpu_devices"):
    jax.config.update("jax_num_cpu_devices", int(cfg["num_cpu_devices"]))
  given = [flags.coordinator_address, flags.num_processes, flags.process_id]
  if any(v is not None for v in given):
    if flags.coordinator_address is None or flags.num_processes is None or flags.process_id is None:
      raise UsageError(
          "multi-host runs need all of --coordinator_address, --num_processes and "
          f"--process_id; got {flags.coordinator_address!r}, {flags.num_processes!r}, "
          f"{flags.process_id!r}.")
    if not 0 <= flags.process_id < flags.num_processes:
      raise UsageError(
          f"--process_id={flags.process_id} is invalid; it must be in [0, {flags.num_processes}).")
    jax.distributed.initialize(coordinator_address=flags.coordinator_address,
                               num_processes=flags.num_processes,
                               process_id=flags.process_id, initialization_timeout=60)
  elif _auto_multihost():
    jax.distributed.initialize()


def main(argv: Sequence[str]) -> None:
  """absl main: config file + flag overrides -> ``run_experiment``."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  flags = absl_flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise UsageError(f"unexpected positional arguments {argv[1:]}; all options are --flags.")
  cfg = flags.config.to_dict()
  for flag, key in (("task", "task"), ("optimizer", "optimizers"), ("steps", "steps"),
                    ("batch_size", "batch_size"), ("learning_rate", "learning_rate"),
                    ("seed", "seed"), ("workdir", "workdir"), ("mesh", "mesh"),
                    ("algorithm", "algorithm")):
    value = getattr(flags, flag)
    if value is not None:
      cfg[key] = value
  if flags.learning_rate is not None and not flags.learning_rate > 0:
    raise UsageError(f"--learning_rate={flags.learning_rate!r} is invalid; it must be > 0.")
  _init_platform(cfg, flags)
  try:
    run_experiment(cfg)
  finally:
    if jax.process_count() > 1:
      jax.distributed.shutdown()


def _run_cli():
  from absl import app  # pylint: disable=g-import-not-at-top

  def guarded(argv):
    try:
      main(argv)
    except UsageError as e:
      # User mistakes: one sentence on stderr, no traceback.
      print(f"gradax.experiments.run: error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(guarded)


if __name__ == "__main__":
  _define_flags()
  _run_cli()
