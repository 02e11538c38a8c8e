"""Device meshes built from spec strings such as ``"data=4,model=2"``.

Every mesh in gradax is built here, with explicit ``axis_types`` (see
ALGORITHMS.md §6.2): jax.make_mesh defaults to Explicit axes on current JAX,
and code that silently relied on Auto mode breaks or inserts hidden
collectives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

KNOWN_AXES = ("data", "fsdp", "model", "expert", "clients")


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
  """Parses ``"data=4,model=2"`` into an ordered ``{"data": 4, "model": 2}``.

  One axis may be ``-1``; ``make_mesh`` then infers it from the device count.

  Raises:
    ValueError: on malformed entries, unknown or repeated axis names, or sizes
      that are not positive integers (or -1).
  """
  if isinstance(spec, Mapping):
    items = [(str(k), v) for k, v in spec.items()]
  else:
    items = []
    for part in str(spec).split(","):
      part = part.strip()
      if not part:
        continue
      name, sep, size = part.partition("=")
      if not sep:
        raise ValueError(
            f"mesh spec {spec!r}: entry {part!r} is not of the form axis=size "
            "(for example 'data=4,model=2').")
      try:
        items.append((name.strip(), int(size)))
      except ValueError:
        raise ValueError(
            f"mesh spec {spec!r}: size {size!r} of axis {name.strip()!r} is "
            "not an integer.") from None
  if not items:
    raise ValueError(f"mesh spec {spec!r} names no axes; expected e.g. 'data=8'.")
  axes: dict[str, int] = {}
  for name, size in items:
    if name not in KNOWN_AXES:
      raise ValueError(
          f"mesh spec {spec!r}: unknown axis {name!r}; known axes are "
          f"{', '.join(KNOWN_AXES)}.")
    if name in axes:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice.")
    if size != -1 and size < 1:
      raise ValueError(
          f"mesh spec {spec!r}: axis {name!r} has size {size}; sizes must be "
          ">= 1 (or -1 for 'the rest of the devices').")
    axes[name] = size
  if list(axes.values()).count(-1) > 1:
    raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1.")
  return axes


def make_mesh(
    spec: str | Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    axis_type: AxisType = AxisType.Explicit,
) -> Mesh:
  """Builds a mesh from a spec, validated against the devices.

  Args:
    spec: ``"data=4,model=2"`` or a mapping ``{"data": 4, "model": 2}``. One
      axis may be -1 to take the remaining devices.
    devices: devices to use; defaults to all of ``jax.devices()`` (every
      process's devices in a multi-host run).
    axis_type: the ``jax.sharding.AxisType`` given to every axis.

  Returns:
    A ``jax.sharding.Mesh`` whose axes appear in the order of ``spec``.

  Raises:
    ValueError: if the spec is malformed or the product of the axis sizes does
      not equal the number of devices.

  Example:
    >>> mesh = make_mesh("data=4,model=2")   # on 8 devices
    >>> mesh.shape
    {'data': 4, 'model': 2}
  """
  axes = parse_mesh_spec(spec)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  known = 1
  for size in axes.values():
    if size != -1:
      known *= size
  if -1 in axes.values():
    if n % known:
      raise ValueError(
          f"mesh spec {spec!r}: the fixed axes multiply to {known}, which does "
          f"not divide the {n} available devices.")
    axes = {k: (n // known if v == -1 else v) for k, v in axes.items()}
  elif known != n:
    raise ValueError(
        f"mesh spec {spec!r} needs {known} devices but {n} are available; "
        "the product of the axis sizes must equal the device count.")
  return jax.make_mesh(
      tuple(axes.values()), tuple(axes.keys()),
      axis_types=(axis_type,) * len(axes), devices=devices)
