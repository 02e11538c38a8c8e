"""comm_bytes: both views, payload_nbytes agreement, ratios, HLO parsing."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gradax import distributed as gd
from gradax.distributed.comm_bytes import hlo_collectives, ring_wire_bytes

N = 8

COMPRESSORS = [
    gd.identity(), gd.cast("bf16"), gd.cast("fp16"), gd.int8(block_size=64),
    gd.int_quantize(4, block_size=32), gd.int_quantize(2, block_size=32),
    gd.scaled_sign("l1"), gd.onebit(), gd.top_k(37), gd.rand_k(40),
    gd.qsgd(15, bucket_size=64), gd.terngrad(), gd.powersgd(3),
    gd.dct_topk(k=8, chunk=16),
]


@pytest.fixture(scope="module")
def mesh():
  return gd.make_mesh("data=8")


def _sharded(mesh, shape, seed=0):
  x = jax.random.normal(jax.random.key(seed), (N,) + shape)
  return jax.device_put(x, NamedSharding(mesh, P("data")))


@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: c.name)
def test_payload_nbytes_equals_measured_bytes(mesh, comp):
  shape = (24, 20)

  def f(xs):
    payload, _ = comp.encode(xs[0], comp.init(shape), jax.random.key(0))
    return jax.tree.map(
        lambda a: lax.all_gather(a, "data", tiled=False, to="invarying"),
        payload)

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"),
                             out_specs=P()))
  cb = gd.comm_bytes(fn, _sharded(mesh, shape))
  expected = comp.payload_nbytes(shape)
  assert cb.requested_operand_bytes == expected
  # Integer payloads are not widened: the compiled program moves them too.
  # (rand-k's 8-byte key is identical on every device, so XLA drops its
  # all_gather: a shared key is never really sent.)
  shared_key = 8 if comp.randomness == "shared" else 0
  assert cb.compiled_operand_bytes == expected - shared_key
  assert cb.wire_bytes == pytest.approx((N - 1) * (expected - shared_key))


def test_f32_psum_and_bf16_widening(mesh):
  d = 1024

  def f(xs):
    return lax.psum(xs[0], "data"), lax.psum(xs[0].astype(jnp.bfloat16),
                                             "data")

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"),
                             out_specs=(P(), P())))
  cb = gd.comm_bytes(fn, _sharded(mesh, (d,)))
  ring = 2 * (N - 1) / N
  # requested: f32 4d + bf16 2d
  assert cb.requested_operand_bytes == 6 * d
  assert cb.requested_wire_bytes == pytest.approx(ring * 6 * d)
  if jax.default_backend() == "cpu":
    # XLA:CPU widens the bf16 all-reduce to f32 (ALGORITHMS.md §6.4).
    assert cb.compiled_operand_bytes == 8 * d
    assert cb.wire_bytes == pytest.approx(ring * 8 * d)


def test_compressed_pmean_ratios(mesh):
  d = 8192

  def exact(xs):
    return lax.psum(xs[0], "data") / N

  def make(comp, schedule):
    def f(xs):
      st = gd.compressed_pmean_init(xs[0], comp, "data", schedule)
      return gd.compressed_pmean(xs[0], comp, "data", st, schedule)[0]
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"),
                                 out_specs=P()))

  xs = _sharded(mesh, (d,))
  base = gd.comm_bytes(jax.jit(jax.shard_map(
      exact, mesh=mesh, in_specs=P("data"), out_specs=P())), xs).wire_bytes
  assert base == pytest.approx(2 * (N - 1) / N * 4 * d)
  onebit = gd.comm_bytes(make(gd.onebit(), "two_phase"), xs).wire_bytes
  assert base / onebit >= 25
  int8 = gd.comm_bytes(make(gd.int8(block_size=1024), "two_phase"),
                       xs).wire_bytes
  assert base / int8 == pytest.approx(4 * 1024 / 1028, rel=0.01)
  # all_gather of a sign payload grows with n: (n-1) d/8 vs 2(n-1)/n d/8.
  ag = gd.comm_bytes(make(gd.onebit(), "all_gather"), xs).wire_bytes
  assert ag > 3 * onebit


def test_scan_trip_count_in_jaxpr_view(mesh):
  def f(xs):
    def body(c, _):
      return c + lax.psum(xs[0], "data"), None
    return lax.scan(body, jnp.zeros_like(xs[0]), None, length=5)[0]

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"),
                             out_specs=P(), check_vma=False))
  cb = gd.comm_bytes(fn, _sharded(mesh, (16,)))
  assert cb.requested_operand_bytes == 5 * 16 * 4


def test_hlo_parser_formats():
  lines = "\n".join([
      "  %ar = f32[64]{0} all-reduce(%p), channel_id=1, "
      "replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add",
      "  %ag = u8[512]{0} all-gather(%x), replica_groups=[1,8]<=[8], "
      "dimensions={0}",
      "  %a2a = (s8[1,8]{1,0}, s8[1,8]{1,0}) all-to-all(%a, %b), "
      "replica_groups=mesh['data'=2] {'data'}",
      "  %ags = (u16[4]{0}, u16[16]{0}) all-gather-start(%y), "
      "replica_groups={{0,1,2,3}}, dimensions={0}",
      "  %cp = f32[10]{0} collective-permute(%z), "
      "source_target_pairs={{0,1},{1,0}}",
      "  %other = f32[10]{0} add(%z, %z)",
  ])
  found = hlo_collectives(lines, num_devices=8)
  assert [c.op for c in found] == ["all-reduce", "all-gather", "all-to-all",
                                   "all-gather", "collective-permute"]
  assert [c.group_size for c in found][:4] == [4, 8, 2, 4]
  assert found[0].wire_bytes == pytest.approx(2 * 3 / 4 * 256)
  assert found[1].operand_bytes == 64
  assert found[2].operand_bytes == 16
  assert found[3].operand_bytes == 8   # u16[16] result / 4 devices
  assert found[4].wire_bytes == 40
  assert ring_wire_bytes("reduce-scatter", 10, 4) == 30
