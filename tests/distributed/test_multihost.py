"""2 processes x 2 CPU devices (jax.distributed on 127.0.0.1) match 1 process
x 4 devices: a DiLoCo round, a ZeRO-3 step and a compressed all-reduce."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np


def scenario():
  """Runs the three programs on a 4-device data mesh; returns host arrays."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec as P

  from gradax import distributed as gd
  from gradax.distributed import sharding as sh
  from gradax.distributed.data_parallel import data_parallel
  from gradax.distributed.diloco import diloco

  mesh = gd.make_mesh("data=4", devices=jax.devices()[:4])
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(8, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  batches = [{"x": rng.normal(size=(8, 8)).astype(np.float32),
              "y": rng.normal(size=(8, 4)).astype(np.float32)}
             for _ in range(2)]

  def loss(p, b):
    return jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)

  def host(tree):
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
        tree)

  out = {}
  dl = diloco(loss, optax.adam(1e-2), mesh, 2, compressor=gd.int8())
  s, _ = dl.round(dl.init(params),
                  jax.tree.map(lambda *x: np.stack(x), *batches))
  out["diloco"] = host(dl.eval_params(s))

  z = data_parallel(loss, optax.adam(1e-2), mesh, plan=3)
  s = z.init(params)
  for b in batches:
    s, _ = z.step(s, b)
  out["zero3"] = host(s.params)

  x = sh.place(rng.normal(size=(4, 64)).astype(np.float32), mesh,
               P("data"))
  comp = gd.int8(block_size=16)

  def body(v):
    st = gd.compressed_pmean_init(v[0], comp, "data")
    mean, _ = gd.compressed_pmean(v[0], comp, "data", st)
    return mean

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"),
                            out_specs=P(), check_vma=False))
  out["pmean"] = host(f(x))
  return out


WORKER = textwrap.dedent("""
  import os, sys
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  port, pid, test_file, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=pid,
                             initialization_timeout=60)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  import importlib.util, numpy as np
  spec = importlib.util.spec_from_file_location("mh", test_file)
  mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
  res = mod.scenario()
  if pid == 0:
    flat = {}
    for k, v in res.items():
      for name, a in (v.items() if isinstance(v, dict) else [("x", v)]):
        flat[f"{k}/{name}"] = a
    np.savez(out, **flat)
  jax.distributed.shutdown()
""")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(test_file, tmp_path, timeout=150):
  """Runs ``scenario()`` of ``test_file`` in 2 processes x 2 CPU devices.

  Returns the flattened host arrays process 0 saved (``"key/name"`` keys);
  fails the test with the tail of a worker's log if either process fails.
  """
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  out = tmp_path / "out.npz"
  port = free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, str(script), str(port), str(i), str(test_file),
       str(out)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return dict(np.load(out))


def test_two_processes_match_one_process(tmp_path):
  got = run_two_processes(__file__, tmp_path)
  want = scenario()
  for k, v in want.items():
    for name, a in (v.items() if isinstance(v, dict) else [("x", v)]):
      np.testing.assert_allclose(got[f"{k}/{name}"], a, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{k}/{name}")
