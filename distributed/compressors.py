"""Compressors: wire formats for communicating gradients and momenta.

A compressor is a small frozen object of pure functions (DESIGN.md,
ALGORITHMS.md §2.1):

* ``init(shape) -> state``: per-tensor compressor state (``()`` for stateless
  compressors; PowerSGD keeps its warm-started ``Q``).
* ``encode(x, state, key) -> (payload, state)``: the payload is a dict of
  integer arrays plus small float scales. bf16/fp16 values travel bitcast to
  ``uint16`` so that the bytes on the wire are the bytes claimed on every
  backend (XLA:CPU widens bf16 collectives to f32, ALGORITHMS.md §6.4).
* ``decode(payload, shape) -> x_hat`` (float32, of ``shape``).
* ``payload_nbytes(shape) -> int``: bytes of one encoded tensor of ``shape``.
* ``linear``: true when summing payloads across workers is meaningful, so the
  ``psum`` reduction schedule is allowed (identity, casts, shared-key rand-k,
  PowerSGD).

Optional hooks used by :func:`gradax.distributed.compressed_pmean`:

* ``psum_payload(payload, axis_name)``: sum of payloads over an axis for linear
  compressors (the default sums every leaf).
* ``reduce(x, state, key, axis_name) -> (mean, state)``: a compressor that
  needs more than one round (PowerSGD) implements its whole reduction here.
* ``encode_chunks(x2d, state, key) -> (payload, state)``: encodes the ``n`` rows
  of ``x2d`` for the two-phase schedule; every payload leaf gets a leading
  axis ``n`` (the default vmaps ``encode`` over rows).
* ``chunk_multiple``: the two-phase schedule pads each row to a multiple of it.
* ``randomness``: ``"none"``, ``"shared"`` (the same key on every worker, e.g.
  rand-k) or ``"private"`` (independent per worker, e.g. QSGD).

Example:
  >>> comp = gradax.distributed.int8(block_size=256)
  >>> payload, _ = comp.encode(x, comp.init(x.shape), None)
  >>> x_hat = comp.decode(payload, x.shape)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Payload = dict[str, jax.Array]
Shape = tuple[int, ...]


def _default_psum_payload(payload, axis_name):
  return jax.tree.map(lambda a: lax.psum(a, axis_name), payload)


@dataclasses.dataclass(frozen=True)
class Compressor:
  """A compressor: pure functions plus the flags the reductions need.

  Attributes:
    name: short name, used in tables and error messages.
    init: ``shape -> state`` (a pytree of arrays, ``()`` when stateless).
    encode: ``(x, state, key) -> (payload, state)``.
    decode: ``(payload, shape) -> float32 array of shape``.
    payload_nbytes: ``shape -> int`` bytes of one payload.
    linear: whether payloads may be summed across workers (``psum``).
    randomness: ``"none"``, ``"shared"`` or ``"private"``.
    chunk_multiple: the two-phase schedule pads each chunk to a multiple.
    psum_payload: optional ``(payload, axis_name) -> payload`` for linear ones.
    reduce: optional ``(x, state, key, axis_name) -> (mean, state)``.
    encode_chunks: optional row-wise encoder for the two-phase schedule.
  """
  name: str
  init: Callable[[Shape], Any]
  encode: Callable[..., tuple[Payload, Any]]
  decode: Callable[[Payload, Shape], jax.Array]
  payload_nbytes: Callable[[Shape], int]
  linear: bool = False
  randomness: str = "none"
  chunk_multiple: int = 1
  psum_payload: Callable[..., Payload] | None = None
  reduce: Callable[..., Any] | None = None
  encode_chunks: Callable[..., tuple[Payload, Any]] | None = None

  def encode_rows(self, x2d, state, key):
    """Encodes each row of ``x2d``; every payload leaf gains a leading axis."""
    if self.encode_chunks is not None:
      return self.encode_chunks(x2d, state, key)
    n = x2d.shape[0]
    keys = None if key is None else jax.random.split(key, n)
    if keys is None:
      payload, _ = jax.vmap(lambda r: self.encode(r, state, None))(x2d)
    else:
      payload, _ = jax.vmap(lambda r, k: self.encode(r, state, k))(x2d, keys)
    return payload, state

  def decode_rows(self, payload, row_shape):
    """Decodes a payload with a leading row axis into ``(n, *row_shape)``."""
    return jax.vmap(lambda p: self.decode(p, row_shape))(payload)

  def sum_payloads(self, payload, axis_name):
    if not self.linear:
      raise ValueError(
          f"compressor {self.name!r} is not linear; summing its payloads is "
          "meaningless. Use schedule='two_phase' or 'all_gather'.")
    fn = self.psum_payload or _default_psum_payload
    return fn(payload, axis_name)


# ---------------------------------------------------------------------------
# helpers


def _size(shape: Shape) -> int:
  return int(math.prod(shape))


def _nbytes(leaves: dict[str, tuple[Shape, Any]]) -> int:
  return sum(_size(s) * np.dtype(d).itemsize for s, d in leaves.values())


def _flat(x):
  return jnp.ravel(x).astype(jnp.float32)


def _check_int(name: str, value, low: int, high: int | None = None):
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not ok or value < low or (high is not None and value > high):
    rng = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an integer {rng}; got {value!r}.")


def pack_bits(bits):
  """Packs a boolean vector into uint8, 8 per byte (big-endian, as numpy)."""
  d = bits.shape[-1]
  pad = (-d) % 8
  if pad:
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
  return jnp.packbits(bits.astype(jnp.uint8), axis=-1)


def unpack_bits(packed, d: int):
  return jnp.unpackbits(packed, axis=-1, count=d)


def _pack_codes(u, bits: int):
  """Packs unsigned codes of ``bits`` bits (8 % bits == 0) into uint8."""
  if bits == 8:
    return u.astype(jnp.uint8)
  per = 8 // bits
  d = u.shape[-1]
  pad = (-d) % per
  u = jnp.pad(u.astype(jnp.uint8), (0, pad)).reshape(-1, per)
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  return jnp.bitwise_or.reduce(u << shifts, axis=-1).astype(jnp.uint8)


def _unpack_codes(packed, bits: int, d: int):
  if bits == 8:
    return packed[:d]
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  mask = jnp.uint8((1 << bits) - 1)
  u = (packed[:, None] >> shifts) & mask
  return u.reshape(-1)[:d]


def _packed_len(d: int, bits: int) -> int:
  return -(-d * bits // 8)


# ---------------------------------------------------------------------------
# identity and casts


def identity() -> Compressor:
  """No compression: the f32 values themselves (4 bytes per element).

  Returns:
    A linear :class:`Compressor`; ``decode(encode(x)) == x`` exactly.
  """
  def encode(x, state, key):
    del key
    return {"values": _flat(x)}, state

  def decode(payload, shape):
    return payload["values"].reshape(shape)

  return Compressor(
      name="identity", init=lambda shape: (), encode=encode, decode=decode,
      payload_nbytes=lambda shape: 4 * _size(shape), linear=True)


_CASTS = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
          "fp16": jnp.float16, "float16": jnp.float16, "f16": jnp.float16}


def cast(dtype: str = "bf16") -> Compressor:
  """Casts to bf16 or fp16; the payload is the bit pattern as ``uint16``.

  Bitcasting keeps XLA:CPU from widening bf16 collectives to f32, so the wire
  carries 2 bytes per element on every backend. The ``psum`` schedule sums in
  the low-precision dtype (like DDP's ``bf16_compress_hook``).

  Args:
    dtype: ``"bf16"`` or ``"fp16"``.

  Returns:
    A linear :class:`Compressor`; the round trip is exact for values already
    representable in ``dtype``.
  """
  if dtype not in _CASTS:
    raise ValueError(
        f"dtype must be one of 'bf16', 'fp16'; got {dtype!r}.")
  low = _CASTS[dtype]

  def encode(x, state, key):
    del key
    return {"bits": lax.bitcast_convert_type(_flat(x).astype(low),
                                             jnp.uint16)}, state

  def decode(payload, shape):
    v = lax.bitcast_convert_type(payload["bits"], low)
    return v.astype(jnp.float32).reshape(shape)

  def psum_payload(payload, axis_name):
    v = lax.bitcast_convert_type(payload["bits"], low)
    return {"bits": lax.bitcast_convert_type(lax.psum(v, axis_name),
                                             jnp.uint16)}

  return Compressor(
      name=f"cast_{jnp.dtype(low).name}", init=lambda shape: (),
      encode=encode, decode=decode,
      payload_nbytes=lambda shape: 2 * _size(shape), linear=True,
      psum_payload=psum_payload)


# ---------------------------------------------------------------------------
# integer block quantization


def int_quantize(bits: int = 8, block_size: int = 256,
                 stochastic: bool = False) -> Compressor:
  """Symmetric absmax block quantization to ``bits``-bit integers.

  Per block b of ``block_size`` elements: s_b = max|x_b| / L with
  L = 2^(bits-1) - 1, code = round(x / s_b) in [-L, L] (stochastic rounding
  makes it unbiased), x_hat = s_b * code. Codes are packed ``8 // bits`` per
  byte; scales are f32.

  Args:
    bits: 2, 4 or 8.
    block_size: elements per scale (>= 1).
    stochastic: use unbiased stochastic rounding (needs a key).

  Returns:
    A non-linear :class:`Compressor` (integer codes must not be psummed).
  """
  if bits not in (2, 4, 8):
    raise ValueError(f"bits must be one of 2, 4, 8; got {bits!r}.")
  _check_int("block_size", block_size, 1)
  levels = (1 << (bits - 1)) - 1
  offset = levels

  def blocks(d):
    return -(-d // block_size)

  def encode(x, state, key):
    v = _flat(x)
    d = v.shape[0]
    nb = blocks(d)
    vb = jnp.pad(v, (0, nb * block_size - d)).reshape(nb, block_size)
    scale = jnp.max(jnp.abs(vb), axis=1) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    y = vb / safe[:, None]
    if stochastic:
      if key is None:
        raise ValueError("int_quantize(stochastic=True) needs a PRNG key.")
      y = jnp.floor(y + jax.random.uniform(key, y.shape))
    else:
      y = jnp.round(y)
    q = jnp.clip(y, -levels, levels).astype(jnp.int32).reshape(-1)[:d]
    codes = _pack_codes((q + offset).astype(jnp.uint8), bits)
    return {"codes": codes, "scales": scale.astype(jnp.float32)}, state

  def decode(payload, shape):
    d = _size(shape)
    q = _unpack_codes(payload["codes"], bits, d).astype(jnp.int32) - offset
    nb = blocks(d)
    q = jnp.pad(q, (0, nb * block_size - d)).reshape(nb, block_size)
    x = (q.astype(jnp.float32) * payload["scales"][:, None]).reshape(-1)
    return x[:d].reshape(shape)

  def nbytes(shape):
    d = _size(shape)
    return _packed_len(d, bits) + 4 * blocks(d)

  return Compressor(
      name=f"int{bits}", init=lambda shape: (), encode=encode, decode=decode,
      payload_nbytes=nbytes, linear=False,
      randomness="private" if stochastic else "none",
      chunk_multiple=8 // bits)


def int8(block_size: int = 256, stochastic: bool = False) -> Compressor:
  """int8 absmax block quantization; see :func:`int_quantize`.

  Bytes vs f32: 4 / (1 + 4 / block_size), i.e. 3.94x at the default 256 and
  3.996x at 4096 (the f32 scale per block is the overhead). The rounding
  step of a block is max|x_block| / 127, so a larger block raises the error
  of every small value that shares a block with a large one; the default
  keeps blocks small for accuracy. Pass ``block_size=4096`` (or larger) when
  the byte ratio matters more. On one char_lm gradient (compression
  benchmark) the relative L2 error ||C(g) - g|| / ||g|| is 1.5% at block
  256, 3.4% at 4096 and 10% with one scale for the whole vector. In the
  two-phase schedule each chunk of
  ``ceil(d / n)`` elements has its own blocks, so send one fused vector
  rather than many small tensors.

  Example:
    >>> comp = int8(block_size=256)   # 1 byte per element + 4 per 256
  """
  return int_quantize(8, block_size, stochastic)


def fixed_point(bits: int = 8) -> Compressor:
  """Integer codes with a unit step and no scale on the wire.

  x_hat = clip(round(x), -L, L) with L = 2^(bits-1) - 1; codes are packed
  ``8 // bits`` per byte, so a payload is exactly ``ceil(d * bits / 8)``
  bytes. The caller picks the resolution by dividing x by a step every
  worker already knows (see
  :func:`gradax.distributed.delayed_scaling_reducer`, which derives it from
  the previous round's mean, so no scale is ever sent).

  Args:
    bits: 2, 4 or 8.

  Returns:
    A non-linear :class:`Compressor` (codes must not be psummed).

  Example:
    >>> comp = fixed_point(8)
    >>> payload, _ = comp.encode(x / step, (), None)   # step known to all
    >>> x_hat = comp.decode(payload, x.shape) * step
  """
  if bits not in (2, 4, 8):
    raise ValueError(f"bits must be one of 2, 4, 8; got {bits!r}.")
  levels = (1 << (bits - 1)) - 1

  def encode(x, state, key):
    del key
    q = jnp.clip(jnp.round(_flat(x)), -levels, levels).astype(jnp.int32)
    return {"codes": _pack_codes((q + levels).astype(jnp.uint8), bits)}, state

  def decode(payload, shape):
    d = _size(shape)
    q = _unpack_codes(payload["codes"], bits, d).astype(jnp.int32) - levels
    return q.astype(jnp.float32).reshape(shape)

  return Compressor(
      name=f"fixed_int{bits}", init=lambda shape: (), encode=encode,
      decode=decode, payload_nbytes=lambda shape: _packed_len(_size(shape),
                                                             bits),
      linear=False, chunk_multiple=8 // bits)


# ---------------------------------------------------------------------------
# scaled sign


def _sign_plus(v):
  return v >= 0  # sign+(0) = +1, as DeepSpeed.


def scaled_sign(scale: str = "l1", shared_chunk_scale: bool = False
                ) -> Compressor:
  """1-bit scaled sign: d bits packed 8 per byte plus one f32 scale.

  C(x) = s * sign+(x), sign+(0) = +1, with s = ||x||_1 / d (``"l1"``,
  EF-SignSGD, Karimireddy et al. 2019, arXiv 1901.09847; contractive with
  delta = ||x||_1^2 / (d ||x||_2^2) >= 1/d) or s = ||x||_2 / sqrt(d)
  (``"rms"``, 1-bit Adam, Tang et al. 2021, arXiv 2102.02888).

  Args:
    scale: ``"l1"`` or ``"rms"``.
    shared_chunk_scale: in the two-phase schedule, compute one scale over the
      whole tensor (as DeepSpeed's worker stage) instead of one per chunk.

  Returns:
    A non-linear :class:`Compressor`.
  """
  if scale not in ("l1", "rms"):
    raise ValueError(f"scale must be 'l1' or 'rms'; got {scale!r}.")

  def scale_of(v, axis=None):
    if scale == "l1":
      return jnp.mean(jnp.abs(v), axis=axis)
    return jnp.sqrt(jnp.mean(jnp.square(v), axis=axis))

  def encode(x, state, key):
    del key
    v = _flat(x)
    return {"bits": pack_bits(_sign_plus(v)),
            "scale": scale_of(v).astype(jnp.float32)}, state

  def decode(payload, shape):
    d = _size(shape)
    b = unpack_bits(payload["bits"], d).astype(jnp.float32)
    return (payload["scale"] * (2.0 * b - 1.0)).reshape(shape)

  def encode_chunks(x2d, state, key):
    del key
    n = x2d.shape[0]
    s = jnp.broadcast_to(scale_of(x2d), (n,)).astype(jnp.float32)
    return {"bits": pack_bits(_sign_plus(x2d)), "scale": s}, state

  return Compressor(
      name=f"sign_{scale}", init=lambda shape: (), encode=encode,
      decode=decode,
      payload_nbytes=lambda shape: _packed_len(_size(shape), 1) + 4,
      linear=False, chunk_multiple=8,
      encode_chunks=encode_chunks if shared_chunk_scale else None)


def onebit(shared_chunk_scale: bool = True) -> Compressor:
  """The 1-bit Adam compressor: RMS-scaled sign with one worker scale.

  Equals ``scaled_sign("rms", shared_chunk_scale=True)``; with the two-phase
  schedule and server error it is DeepSpeed's ``compressed_allreduce``.
  """
  return scaled_sign("rms", shared_chunk_scale=shared_chunk_scale)


# ---------------------------------------------------------------------------
# sparsifiers


def _index_dtype(d: int):
  return jnp.int16 if d <= np.iinfo(np.int16).max + 1 else jnp.int32


def _check_k(k, d, name="k"):
  if k > d:
    raise ValueError(
        f"{name}={k} is larger than the tensor size {d}; it must be in "
        f"[1, {d}].")


def top_k(k: int) -> Compressor:
  """Top-k sparsification: the k largest-magnitude values and their indices.

  C(x) keeps x_i for the k largest |x_i| and zeros the rest; it is
  contractive: ||C(x) - x||^2 <= (1 - k/d) ||x||^2 (Stich et al. 2018,
  arXiv 1809.07599). Indices are int16 when d <= 32768, else int32.

  Args:
    k: values kept per tensor (>= 1, at most the tensor size).

  Returns:
    A non-linear :class:`Compressor` (use ``schedule='all_gather'``).
  """
  _check_int("k", k, 1)

  def encode(x, state, key):
    del key
    v = _flat(x)
    d = v.shape[0]
    _check_k(k, d)
    _, idx = lax.top_k(jnp.abs(v), k)
    return {"values": v[idx], "indices": idx.astype(_index_dtype(d))}, state

  def decode(payload, shape):
    d = _size(shape)
    idx = payload["indices"].astype(jnp.int32)
    return jnp.zeros((d,), jnp.float32).at[idx].set(
        payload["values"]).reshape(shape)

  def nbytes(shape):
    d = _size(shape)
    _check_k(k, d)
    return k * (4 + np.dtype(_index_dtype(d)).itemsize)

  return Compressor(name=f"top{k}", init=lambda shape: (), encode=encode,
                    decode=decode, payload_nbytes=nbytes, linear=False)


def rand_k(k: int) -> Compressor:
  """Rand-k with a shared key: k values, no indices on the wire.

  The support S (k of d indices, uniform without replacement) is drawn from a
  key that every worker shares, so C(x) = (d/k) * x_S scattered is unbiased
  (E C(x) = x) and linear: payloads sum. The payload carries the 8-byte key
  so ``decode`` can rebuild S; the ``psum`` schedule sums only the values.

  Args:
    k: values per tensor (>= 1, at most the tensor size).

  Returns:
    A linear :class:`Compressor` with ``randomness="shared"``.
  """
  _check_int("k", k, 1)

  def support(key_data, d):
    key = jax.random.wrap_key_data(key_data)
    return jax.random.choice(key, d, (k,), replace=False)

  def encode(x, state, key):
    if key is None:
      raise ValueError("rand_k needs a PRNG key shared by all workers.")
    v = _flat(x)
    d = v.shape[0]
    _check_k(k, d)
    key_data = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)[:2]
    idx = support(key_data, d)
    return {"values": v[idx], "key": key_data}, state

  def decode(payload, shape):
    d = _size(shape)
    idx = support(payload["key"], d)
    return (jnp.zeros((d,), jnp.float32).at[idx].set(payload["values"])
            * (d / k)).reshape(shape)

  def psum_payload(payload, axis_name):
    return {"values": lax.psum(payload["values"], axis_name),
            "key": payload["key"]}

  def nbytes(shape):
    _check_k(k, _size(shape))
    return 4 * k + 8

  return Compressor(name=f"rand{k}", init=lambda shape: (), encode=encode,
                    decode=decode, payload_nbytes=nbytes, linear=True,
                    randomness="shared", psum_payload=psum_payload)


# ---------------------------------------------------------------------------
# unbiased quantizers


def qsgd(levels: int = 127, bucket_size: int = 128) -> Compressor:
  """QSGD with s levels: unbiased stochastic quantization per bucket.

  Per bucket v: l_i = floor(s |v_i| / ||v||) + Bernoulli(frac), and
  Q(v_i) = ||v|| / s * sign(v_i) * l_i, so E Q(v) = v (Alistarh et al. 2017,
  arXiv 1610.02132). Signed levels travel as int8 (s <= 127), norms as f32.

  Args:
    levels: s, in [1, 127].
    bucket_size: elements per norm (>= 1); GRACE uses 128.

  Returns:
    A non-linear :class:`Compressor` with private randomness.
  """
  _check_int("levels", levels, 1, 127)
  _check_int("bucket_size", bucket_size, 1)

  def nb(d):
    return -(-d // bucket_size)

  def encode(x, state, key):
    if key is None:
      raise ValueError("qsgd needs a PRNG key.")
    v = _flat(x)
    d = v.shape[0]
    vb = jnp.pad(v, (0, nb(d) * bucket_size - d)).reshape(nb(d), bucket_size)
    norm = jnp.linalg.norm(vb, axis=1)
    safe = jnp.where(norm > 0, norm, 1.0)
    y = levels * jnp.abs(vb) / safe[:, None]
    lo = jnp.floor(y)
    lvl = lo + (jax.random.uniform(key, y.shape) < (y - lo))
    q = (jnp.sign(vb) * jnp.minimum(lvl, levels)).astype(jnp.int8)
    return {"levels": q.reshape(-1)[:d], "norms": norm}, state

  def decode(payload, shape):
    d = _size(shape)
    q = jnp.pad(payload["levels"].astype(jnp.float32),
                (0, nb(d) * bucket_size - d)).reshape(nb(d), bucket_size)
    x = q * (payload["norms"] / levels)[:, None]
    return x.reshape(-1)[:d].reshape(shape)

  return Compressor(
      name=f"qsgd{levels}", init=lambda shape: (), encode=encode,
      decode=decode,
      payload_nbytes=lambda shape: _size(shape) + 4 * nb(_size(shape)),
      linear=False, randomness="private")


def terngrad(clip_sigma: float | None = 2.5) -> Compressor:
  """TernGrad: unbiased ternary {-1, 0, +1} codes plus one scale.

  g is first clipped to [-c sigma, c sigma] (c = ``clip_sigma``); then
  s = max|g|, b_i ~ Bernoulli(|g_i| / s) and T(g)_i = s sign(g_i) b_i, so
  E T(g) = clipped g (Wen et al. 2017, arXiv 1705.07878). Codes are packed
  4 per byte (2 bits each).

  Args:
    clip_sigma: clipping threshold in standard deviations (> 0), or None.

  Returns:
    A non-linear :class:`Compressor` with private randomness.
  """
  if clip_sigma is not None and not clip_sigma > 0:
    raise ValueError(f"clip_sigma must be > 0 or None; got {clip_sigma!r}.")

  def encode(x, state, key):
    if key is None:
      raise ValueError("terngrad needs a PRNG key.")
    v = _flat(x)
    if clip_sigma is not None:
      c = clip_sigma * jnp.std(v)
      v = jnp.clip(v, -c, c)
    s = jnp.max(jnp.abs(v))
    safe = jnp.where(s > 0, s, 1.0)
    b = jax.random.uniform(key, v.shape) < jnp.abs(v) / safe
    t = (jnp.sign(v) * b).astype(jnp.int32)
    return {"codes": _pack_codes((t + 1).astype(jnp.uint8), 2),
            "scale": s.astype(jnp.float32)}, state

  def decode(payload, shape):
    d = _size(shape)
    t = _unpack_codes(payload["codes"], 2, d).astype(jnp.float32) - 1.0
    return (payload["scale"] * t).reshape(shape)

  return Compressor(
      name="terngrad", init=lambda shape: (), encode=encode, decode=decode,
      payload_nbytes=lambda shape: _packed_len(_size(shape), 2) + 4,
      linear=False, randomness="private", chunk_multiple=4)
