"""Flower deployment: a real SuperLink and 2 SuperNodes on 127.0.0.1 run 3
rounds of FedAU; the result must equal the in-process simulation."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

flwr = pytest.importorskip(
    "flwr", reason="Flower is the optional extra gradax[flower]; "
    "install it with pip install -e '.[flower]'")

from gradax.federated import flower  # noqa: E402

BIN = pathlib.Path(sys.executable).parent


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_port(port, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.2)
  raise TimeoutError(f"port {port} did not open within {timeout} s")


RUN_CONFIG = {"num-clients": 2, "num-rounds": 3, "seed": 0,
              # client 0 misses round 1, so its round-3 FedAU weight is 2
              "participation": "011,110", "local-steps": 5}


def test_flower_deployment_equals_simulation(tmp_path):
  for exe in ("flower-superlink", "flower-supernode", "flwr"):
    assert (BIN / exe).exists() or shutil.which(exe), f"{exe} not installed"
  app = tmp_path / "app"
  app.mkdir()
  out = tmp_path / "out.npz"
  cfg = dict(RUN_CONFIG, **{"output-path": str(out)})
  (app / "pyproject.toml").write_text(
      flower.app_pyproject("gradax_fedau_app", run_config=cfg))
  (app / "gradax_fedau_app.py").write_text(
      "from gradax.federated import flower\n"
      "server_app = flower.server_app(flower.demo_experiment)\n"
      "client_app = flower.client_app(flower.demo_experiment)\n")
  home = tmp_path / "flwr_home"
  home.mkdir()
  port = _free_port()
  (home / "config.toml").write_text(
      '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
  env = dict(os.environ, FLWR_HOME=str(home), JAX_PLATFORMS="cpu",
             PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
  env.pop("XLA_FLAGS", None)
  log = open(tmp_path / "flower.log", "w")
  procs = []

  def start(args):
    procs.append(subprocess.Popen(args, env=env, stdout=log,
                                  stderr=subprocess.STDOUT,
                                  start_new_session=True))
  try:
    start([str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
           "--disable-runtime-dependency-installation"])
    _wait_port(port, 60)
    for i in range(2):
      start([str(BIN / "flower-supernode"), "--insecure", "--superlink",
             f"127.0.0.1:{port}", "--port", str(_free_port()),
             "--node-config", f"partition-id={i}", "--max-wait-time", "60"])
    run = subprocess.run([str(BIN / "flwr"), "run", str(app), "local",
                          "--stream"], env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    for p in procs:
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    log.close()
  assert out.exists(), (tmp_path / "flower.log").read_text()[-3000:]

  got = np.load(out)
  exp = flower.demo_experiment(RUN_CONFIG)
  state, _ = flower.simulate(exp)
  leaves = jax.tree.leaves(state.params)
  for i, leaf in enumerate(leaves):
    np.testing.assert_allclose(got[f"params_{i}"], np.asarray(leaf),
                               rtol=1e-6, atol=1e-7)
  # the model moved, and FedAU's interval statistics agree exactly
  assert np.abs(got["params_0"]).max() > 1e-3
  np.testing.assert_array_equal(got["interval_sum"],
                                np.asarray(state.agg_state.interval_sum))
  np.testing.assert_array_equal(got["interval_count"], [2, 2])
