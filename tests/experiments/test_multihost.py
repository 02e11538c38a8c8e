"""The runner as 2 local processes x 4 CPU devices equals 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from gradax.experiments import run as runner

ARGS = dict(task="digits_mlp", optimizers="adamw", steps=6, batch_size=16, mesh="data=8",
            log_every=1, eval_every=3, checkpoint_every=3, progress=False)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(path):
  with open(path) as f:
    recs = [json.loads(line) for line in f]
  return [(r["step"], r["split"], r["loss"]) for r in recs]


def test_two_processes_match_one_process(tmp_path):
  runner.run_experiment({**ARGS, "workdir": str(tmp_path / "single")})  # 1 x 8 (conftest)
  port = _free_port()
  cmd = [sys.executable, "-m", "gradax.experiments.run",
         f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", "--config.num_cpu_devices=4", f"--task={ARGS['task']}",
         f"--optimizer={ARGS['optimizers']}", f"--steps={ARGS['steps']}",
         f"--batch_size={ARGS['batch_size']}", f"--mesh={ARGS['mesh']}"]
  cmd += [f"--config.{k}={v}" for k in ("log_every", "eval_every", "checkpoint_every", "progress")
          for v in [ARGS[k]]]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=120)[0])  # hard cap against hangs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  want = _losses(tmp_path / "single" / "adamw" / "metrics.jsonl")
  got0 = _losses(tmp_path / "multi" / "adamw" / "metrics.jsonl")
  got1 = _losses(tmp_path / "multi" / "adamw" / "metrics.process1.jsonl")
  assert [s for s, _, _ in want] == [0, 1, 2, 3, 3, 4, 5, 6, 6]
  assert got0 == got1  # both processes see the same (global) values
  assert [(s, k) for s, k, _ in got0] == [(s, k) for s, k, _ in want]
  np.testing.assert_allclose([v for _, _, v in got0], [v for _, _, v in want], rtol=1e-6)
  assert sorted(os.listdir(tmp_path / "multi" / "adamw" / "checkpoints")) == ["3", "6"]
