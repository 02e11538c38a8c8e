"""Counting the bytes that cross devices, two ways (ALGORITHMS.md §6.9).

1. **Jaxpr walk**: what the program asked for. Every collective equation
   (psum, all_gather, all_to_all, ppermute, ...) inside ``shard_map``, ``jit``,
   ``cond`` and loop bodies (times their trip count) is recorded with the
   dtype and per-device shape of its inputs. bf16 stays bf16 in this view.
2. **Compiled HLO**: what the backend does. Collective instructions of
   ``jax.jit(fn).lower(*args).compile().as_text()`` with their result shapes
   and group sizes, converted to per-device wire bytes with a ring model.

**XLA:CPU widens low-precision collectives**: in compiled CPU HLO a bf16
psum / all_gather / all_to_all / ppermute becomes f32 and float8 becomes f16,
so the compiled view of a bf16 payload is twice the requested bytes on CPU.
gradax compressors bitcast such payloads to uint16/uint8, for which both
views agree on every backend.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np

COLLECTIVES = ("psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute",
               "psum_scatter", "reduce_scatter", "ragged_all_to_all",
               "all_gather_invariant", "psum_invariant")

HLO_OPS = ("all-reduce", "all-gather", "all-to-all", "collective-permute",
           "reduce-scatter", "ragged-all-to-all")

_HLO_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective.

  Attributes:
    op: primitive name (jaxpr) or HLO opcode.
    dtype: element type as a string (``"uint8"`` / ``"u8"``).
    shape: per-device operand shape (jaxpr) or result shape (HLO).
    group_size: n, the number of devices in the group (0 if unknown).
    operand_bytes: bytes of this device's operand (the payload it offers).
    wire_bytes: ring-model bytes sent per device.
    count: how many times it runs per call (loop trip counts).
  """
  op: str
  dtype: str
  shape: tuple[int, ...]
  group_size: int
  operand_bytes: float
  wire_bytes: float
  count: int = 1


@dataclasses.dataclass(frozen=True)
class CommBytes:
  """Bytes per call of a function, in both views.

  Attributes:
    requested: collectives found in the jaxpr (dtypes as requested).
    compiled: collectives found in the compiled HLO (after CPU widening).
  """
  requested: tuple[Collective, ...]
  compiled: tuple[Collective, ...]

  @property
  def requested_operand_bytes(self) -> float:
    """Sum of per-device operand bytes in the jaxpr view (payload bytes)."""
    return sum(c.operand_bytes * c.count for c in self.requested)

  @property
  def requested_wire_bytes(self) -> float:
    return sum(c.wire_bytes * c.count for c in self.requested)

  @property
  def compiled_operand_bytes(self) -> float:
    return sum(c.operand_bytes * c.count for c in self.compiled)

  @property
  def wire_bytes(self) -> float:
    """Per-device bytes on the wire (ring model) from the compiled HLO."""
    return sum(c.wire_bytes * c.count for c in self.compiled)

  def summary(self) -> dict[str, float]:
    return {"requested_operand_bytes": self.requested_operand_bytes,
            "requested_wire_bytes": self.requested_wire_bytes,
            "compiled_operand_bytes": self.compiled_operand_bytes,
            "wire_bytes": self.wire_bytes,
            "num_collectives": len(self.compiled)}


def ring_wire_bytes(op: str, result_bytes: float, n: int) -> float:
  """Per-device bytes sent by a ring implementation, from the result size S.

  all-reduce 2(n-1)/n S; all-gather (n-1)/n S; all-to-all (n-1)/n S;
  reduce-scatter (n-1) S; collective-permute S.
  """
  op = op.replace("_", "-")
  if n <= 1 and op != "collective-permute":
    return 0.0
  if op in ("all-reduce", "psum", "pmax", "pmin", "psum-invariant"):
    return 2 * (n - 1) / n * result_bytes
  if op in ("all-gather", "all-to-all", "ragged-all-to-all",
            "all-gather-invariant"):
    return (n - 1) / n * result_bytes
  if op in ("reduce-scatter", "psum-scatter"):
    return (n - 1) * result_bytes
  return float(result_bytes)


# --------------------------------------------------------------------------
# jaxpr walk


def _subjaxprs(params):
  for v in params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      inner = getattr(item, "jaxpr", item)
      if hasattr(inner, "eqns"):
        yield inner


def _axis_names(params):
  names = params.get("axis_name", params.get("axes", ()))
  if not isinstance(names, (list, tuple)):
    names = (names,)
  return tuple(names)


def _walk(jaxpr, sizes: dict, mult: int, found: list):
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    inner_sizes = sizes
    inner_mult = mult
    if name == "shard_map":
      mesh = eqn.params.get("mesh")
      inner_sizes = dict(sizes)
      if mesh is not None:
        inner_sizes.update(dict(mesh.shape))
    elif name == "scan":
      inner_mult = mult * int(eqn.params.get("length", 1))
    if name in COLLECTIVES:
      n = 1
      for a in _axis_names(eqn.params):
        if isinstance(a, str):
          n *= int(sizes.get(a, 0)) or 0
      for v in eqn.invars:
        aval = v.aval
        if not hasattr(aval, "dtype"):
          continue
        b = math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
        if name.startswith("all_gather"):
          result = b * n
        elif name in ("psum_scatter", "reduce_scatter"):
          result = b / max(n, 1)
        else:
          result = b
        found.append(Collective(
            op=name, dtype=str(aval.dtype), shape=tuple(aval.shape),
            group_size=n, operand_bytes=b,
            wire_bytes=ring_wire_bytes(name, result, n), count=mult))
    for sub in _subjaxprs(eqn.params):
      _walk(sub, inner_sizes, inner_mult, found)
  return found


def jaxpr_collectives(fn, *args, **kwargs) -> tuple[Collective, ...]:
  """Collectives requested by ``fn(*args)``, from its jaxpr.

  ``while`` loops count once (their trip count is not static); ``scan``
  bodies count ``length`` times; both branches of a ``cond`` are counted.
  """
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return tuple(_walk(closed.jaxpr, {}, 1, []))


# --------------------------------------------------------------------------
# compiled HLO

_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<op>" + "|".join(HLO_OPS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_GROUPS_BRACES = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(?P<g>\d+),(?P<n>\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<sel>[^}]*)\}")


def _group_size(line: str, num_devices: int) -> int:
  m = _GROUPS_BRACES.search(line)
  if m:
    return len([t for t in m.group("first").split(",") if t.strip()])
  m = _GROUPS_IOTA.search(line)
  if m:
    return int(m.group("n"))
  m = _GROUPS_MESH.search(line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group("axes")))
    sel = re.findall(r"'(\w+)'", m.group("sel"))
    return math.prod(int(sizes[a]) for a in sel if a in sizes) or num_devices
  return num_devices


def hlo_collectives(hlo_text: str, num_devices: int) -> tuple[Collective, ...]:
  """Parses collective instructions out of compiled HLO text.

  Result sizes are summed over tuple elements (CPU lowers all-to-all to a
  tuple of n pieces); for asynchronous ``*-start`` ops only the result element
  of the (operand, result) tuple is kept, except all-reduce-start whose
  elements are all results.
  """
  found = []
  for line in hlo_text.splitlines():
    m = _LINE.match(line)
    if not m:
      continue
    op = m.group("op")
    arrays = _ARRAY.findall(m.group("shape"))
    if m.group("start") and op != "all-reduce" and len(arrays) > 1:
      arrays = arrays[len(arrays) // 2:]
    total = 0.0
    dtype = arrays[0][0] if arrays else "?"
    shape = ()
    for dt, dims in arrays:
      dims_t = tuple(int(s) for s in dims.split(",") if s)
      shape = dims_t
      total += math.prod(dims_t) * _HLO_DTYPE_BYTES.get(dt, 4)
    n = _group_size(line, num_devices)
    if op == "collective-permute":
      n_eff = 2
    else:
      n_eff = n
    if op == "all-gather":
      operand = total / max(n, 1)
    elif op == "reduce-scatter":
      operand = total * n
    else:
      operand = total
    found.append(Collective(
        op=op, dtype=dtype, shape=shape, group_size=n, operand_bytes=operand,
        wire_bytes=ring_wire_bytes(op, total, n_eff)))
  return tuple(found)


def comm_bytes(fn, *args, **kwargs) -> CommBytes:
  """Bytes that cross devices per call of ``fn(*args)``.

  Reads the jaxpr (requested collectives) and the lowered, compiled program
  (the backend's collectives). ``CommBytes.wire_bytes`` is the ring-model
  per-device send volume from the compiled HLO;
  ``requested_operand_bytes`` is the per-device payload the program asked to
  move, which equals a compressor's ``payload_nbytes`` for one all_gather of
  its payload. Note: XLA:CPU widens bf16 (to f32) and fp8 (to f16)
  collectives, so the compiled view of those dtypes is larger on CPU; gradax
  payloads avoid this by bitcasting to unsigned integers. The HLO is static:
  a collective under ``lax.cond`` counts as if it always runs.

  Args:
    fn: a function (jitted or not), typically wrapping ``jax.shard_map``.
    *args: example arguments, placed as they will be at run time.
    **kwargs: passed to ``fn``.

  Returns:
    A :class:`CommBytes`.

  Example:
    >>> cb = comm_bytes(step, grads)
    >>> cb.wire_bytes, cb.requested_operand_bytes
  """
  requested = jaxpr_collectives(fn, *args, **kwargs)
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  compiled = jitted.lower(*args, **kwargs).compile()
  text = compiled.as_text()
  try:
    num_devices = len(compiled.input_shardings[0][0].device_set) if \
        compiled.input_shardings and compiled.input_shardings[0] else \
        jax.device_count()
  except Exception:  # pylint: disable=broad-except
    num_devices = jax.device_count()
  return CommBytes(requested=requested,
                   compiled=hlo_collectives(text, num_devices))
