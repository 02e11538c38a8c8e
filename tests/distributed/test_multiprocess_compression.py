"""compressed_pmean and 1-bit Adam on 2 processes x 2 devices equal 1 process
x 4 devices (jax.distributed on 127.0.0.1, hard timeouts)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TIMEOUT = 240

WORKER = textwrap.dedent("""
    import json, sys
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    import jax
    jax.config.update("jax_num_cpu_devices", 4 // nproc)
    if nproc > 1:
      jax.distributed.initialize(coordinator_address="127.0.0.1:" + port,
                                 num_processes=nproc, process_id=pid,
                                 initialization_timeout=60)
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from gradax import distributed as gd
    from gradax.optimizers.onebit_adam import onebit_adam

    mesh = gd.make_mesh("data=4")
    spec = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(4, 64)).astype(np.float32)
    glob = lambda a: jax.make_array_from_callback(a.shape, spec,
                                                  lambda idx: a[idx])
    local = lambda a: np.asarray(a.addressable_data(0)).tolist()
    out = {}
    for name, comp, sched in (("int8", gd.int8(block_size=16), "two_phase"),
                              ("onebit", gd.onebit(), "two_phase"),
                              ("topk", gd.top_k(8), "all_gather")):
      def f(x, comp=comp, sched=sched):
        st = gd.compressed_pmean_init(x[0], comp, "data", sched)
        return gd.compressed_pmean(x[0], comp, "data", st, sched)[0]
      fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"),
                                 out_specs=P(), check_vma=False))
      out[name] = local(fn(glob(xs)))

    # Three 1-bit Adam steps (warm-up 1, then compressed) on local grads.
    tx = onebit_adam(0.1, freeze_step=1, axis_name="data")
    w0 = np.zeros((64,), np.float32)
    st0 = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a),
                                                 (4,) + np.shape(a)).copy(),
                       tx.init(w0))
    def steps(w, st, x):
      st = jax.tree.map(lambda a: a[0], st)
      for t in range(3):
        g = x[0] * (w - 1.0) + 0.1 * t
        u, st = tx.update(g, st, w)
        w = optax.apply_updates(w, u)
      return w, jax.tree.map(lambda a: a[None], st)
    fn = jax.jit(jax.shard_map(steps, mesh=mesh,
                               in_specs=(P(), P("data"), P("data")),
                               out_specs=(P(), P("data")), check_vma=False))
    rep = NamedSharding(mesh, P())
    w = jax.make_array_from_callback(w0.shape, rep, lambda idx: w0[idx])
    st = jax.tree.map(glob, st0)
    w, st = fn(w, st, glob(xs))
    out["onebit_adam_w"] = local(w)
    we = st[0].worker_error
    out["worker_error_shard"] = [np.asarray(s.data).tolist()
                                 for s in we.addressable_shards]
    out["replicas"] = [s.index[0].start for s in we.addressable_shards]
    print("RESULT=" + json.dumps(out), flush=True)
    if nproc > 1:
      jax.distributed.shutdown()
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(nproc, tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(nproc),
                             port], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(nproc)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=TIMEOUT)
      assert p.returncode == 0, err[-3000:]
      line = [l for l in out.splitlines() if l.startswith("RESULT=")][-1]
      results.append(json.loads(line[len("RESULT="):]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results


def test_two_processes_match_one_process(tmp_path):
  single = _launch(1, tmp_path)[0]
  multi = _launch(2, tmp_path)
  for r in multi:
    for key in ("int8", "onebit", "topk", "onebit_adam_w"):
      # f32 all-reduce order differs across processes (gloo): ~1 ulp.
      np.testing.assert_allclose(r[key], single[key], rtol=1e-5, atol=1e-5)
  # Per-replica worker errors: each process holds its own two replicas, and
  # they equal the single process's replicas of the same index.
  by_rep = dict(zip(single["replicas"], single["worker_error_shard"]))
  seen = set()
  for r in multi:
    for rep, shard in zip(r["replicas"], r["worker_error_shard"]):
      np.testing.assert_allclose(shard, by_rep[rep], rtol=1e-5, atol=1e-5)
      seen.add(rep)
  assert seen == set(by_rep) == {0, 1, 2, 3}
  assert not np.allclose(single["worker_error_shard"][0],
                         single["worker_error_shard"][1])
