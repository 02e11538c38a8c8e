"""The runner: bad input, resume, checkpoint fallback, refusal, outputs."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from gradax.experiments import run as runner
from gradax.experiments import tasks

BASE = dict(task="digits_mlp", optimizers="adamw", steps=20, batch_size=16, mesh="data=8",
            log_every=1, eval_every=5, checkpoint_every=5, keep_checkpoints=2, progress=False)


def _cfg(workdir, **kw):
  return {**BASE, "workdir": str(workdir), **kw}


def _records(workdir, label="adamw"):
  with open(os.path.join(workdir, label, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  for r in recs:
    r.pop("steps_per_sec", None)  # wall-clock, not a metric
  return recs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 20-step run."""
  workdir = tmp_path_factory.mktemp("ref")
  rows = runner.run_experiment(_cfg(workdir))
  return workdir, rows


def test_reference_run_outputs(reference):
  workdir, rows = reference
  recs = _records(workdir)
  assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 21))
  assert [r["step"] for r in recs if r["split"] == "eval"] == [0, 5, 10, 15, 20]
  assert rows[0]["optimizer"] == "adamw" and rows[0]["status"] == "ok"
  assert rows[0]["eval_accuracy"] == recs[-1]["accuracy"]
  for name in ("summary.md", "summary.json", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "adamw", "tb")))
  assert sorted(os.listdir(os.path.join(workdir, "adamw", "checkpoints"))) == ["15", "20"]


def test_runner_step_matches_plain_optax_loop(reference):
  """The first logged losses equal a hand-written optax loop on the same batches."""
  workdir, _ = reference
  task = tasks.get_task("digits_mlp")
  params = task.init(jax.random.key(0))
  tx = optax.adamw(3e-3)  # the tuned table's entry for (adamw, digits_mlp)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, g = jax.value_and_grad(task.loss)(params, batch)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, loss

  losses = []
  for i in range(5):
    params, state, loss = step(params, state, task.train_batch(i, 16, 0))
    losses.append(float(loss))
  got = [r["loss"] for r in _records(workdir) if r["split"] == "train"][:5]
  np.testing.assert_allclose(got, losses, rtol=1e-5)


def test_resume_after_kill_gives_identical_metrics(reference, tmp_path):
  ref_dir, _ = reference
  # First invocation dies at step 12 (after the step-10 checkpoint, with
  # metrics for steps 11-12 already written); the same command then resumes.
  runner.run_experiment(_cfg(tmp_path, stop_after_step=12))
  assert max(r["step"] for r in _records(tmp_path)) == 12
  runner.run_experiment(_cfg(tmp_path))
  assert _records(tmp_path) == _records(ref_dir)


def test_corrupt_latest_checkpoint_falls_back_with_warning(reference, tmp_path):
  ref_dir, _ = reference
  shutil.copytree(ref_dir / "adamw", tmp_path / "adamw")
  latest = tmp_path / "adamw" / "checkpoints" / "20"
  files = [p for p in latest.rglob("*") if p.is_file()]
  assert files
  for p in files:  # a partially written, truncated step
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
  with pytest.warns(RuntimeWarning, match=r"checkpoint at step 20 .* corrupt or partial.*falling back to step 15"):
    runner.run_experiment(_cfg(tmp_path, steps=20))
  assert _records(tmp_path) == _records(ref_dir)
  assert (tmp_path / "adamw" / "checkpoints" / "20.corrupt").is_dir()


def test_different_config_is_refused_and_not_overwritten(reference, tmp_path):
  shutil.copytree(reference[0] / "adamw", tmp_path / "adamw")
  run_dir = tmp_path / "adamw"
  before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
  with pytest.raises(runner.UsageError, match=r"holds a run with a different configuration \(steps: 20 -> 30\); refusing"):
    runner.run_experiment(_cfg(tmp_path, steps=30))
  with pytest.raises(ValueError, match=r"different configuration \(batch_size: 16 -> 32\)"):
    runner.run_experiment(_cfg(tmp_path, batch_size=32))
  (run_dir / "config.json").unlink()  # checkpoints of an unknown configuration
  before.pop(run_dir / "config.json")
  with pytest.raises(ValueError, match=r"holds checkpoints but no config.json"):
    runner.run_experiment(_cfg(tmp_path))
  after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
  assert after == before


@pytest.mark.parametrize("override, pattern", [
    (dict(task="nope"), r"unknown task 'nope'; valid tasks are char_lm, digits_mlp, .*quadratic, rosenbrock\."),
    (dict(optimizers="adamw,foo"), r"unknown optimizer 'foo'; valid optimizers are .*adamw.*sgd"),
    (dict(mesh="data=3"), r"'data=3' needs 3 devices but 8 are available"),
    (dict(mesh="data=4,model=2", batch_size=6), r"batch_size=6 is not divisible by the mesh's data axis \(size 4\)"),
    (dict(optimizers="adamw:b2=1.0"), r"optimizer 'adamw': hyperparameter b2=1.0 is invalid; it must be in \[0, 1\)"),
    (dict(optimizers="sgd:learning_rate=-0.1"), r"hyperparameter learning_rate=-0.1 is invalid; it must be > 0"),
    (dict(optimizers="adamw:bogus=1"), r"optimizer 'adamw' has no hyperparameter 'bogus'; its hyperparameters are b1, b2"),
    (dict(optimizers="adamw:b1"), r"'b1' is not of the form key=value"),
    (dict(task="char_lm:d_model=30"), r"d_model=30 is not divisible by num_heads=4"),
    (dict(steps=0), r"steps=0 is invalid; it must be a positive integer"),
])
def test_bad_input_is_one_clear_value_error(tmp_path, override, pattern):
  # UsageError (a ValueError) is what the CLI prints as one line; other errors keep tracebacks.
  with pytest.raises(runner.UsageError, match=pattern):
    runner.run_experiment(_cfg(tmp_path, **override))
  assert not (tmp_path / "adamw").exists()  # nothing written before validation


def test_spec_parsing():
  assert runner.parse_spec("shampoo:block_size=64:b2=0.99:nesterov=true:mu_dtype=none") == (
      "shampoo", {"block_size": 64, "b2": 0.99, "nesterov": True, "mu_dtype": None})


def test_comm_bytes_hook_sums_named_fields():
  from typing import NamedTuple

  class S(NamedTuple):
    comm_bytes: jax.Array
    mu: jax.Array

  state = (optax.EmptyState(), S(np.float32(10.0), np.zeros(3)), [S(np.float32(2.5), np.ones(2))])
  assert float(runner.comm_bytes(state)) == 12.5
  per_replica = S(np.array([4.0, 4.0, 6.0, 6.0], np.float32), np.zeros(3))  # leading replica axis
  assert float(runner.comm_bytes(per_replica)) == 5.0
  assert runner.comm_bytes((optax.EmptyState(),)) is None


def test_model_axis_shards_params_and_matches_data_only(reference, tmp_path):
  runner.run_experiment(_cfg(tmp_path, steps=3, checkpoint_every=0, eval_every=0,
                             mesh="data=4,model=2"))
  got = [r["loss"] for r in _records(tmp_path) if r["split"] == "train"]
  want = [r["loss"] for r in _records(reference[0]) if r["split"] == "train"][:3]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  assert runner.leaf_sharding(mesh, (64, 128)).spec == jax.sharding.PartitionSpec(None, "model")
  assert runner.leaf_sharding(mesh, (10,)).spec == jax.sharding.PartitionSpec()


def test_cli_bad_input_prints_one_sentence(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "gradax.experiments.run", "--optimizer=adamw,nope",
       f"--workdir={tmp_path}", "--steps=2"],
      capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr
  assert lines[-1].startswith("gradax.experiments.run: error: unknown optimizer 'nope'; valid optimizers are")


def test_rerun_of_finished_run_trains_nothing(reference, tmp_path):
  ref_dir, rows = reference
  shutil.copytree(ref_dir / "adamw", tmp_path / "adamw")
  again = runner.run_experiment(_cfg(tmp_path))
  assert again == rows
  assert _records(tmp_path) == _records(ref_dir)


def test_comparison_with_a_diverging_optimizer(tmp_path):
  """A comparison keeps going past a diverging optimizer and never checkpoints NaN."""
  rows = runner.run_experiment(_cfg(tmp_path, task="quadratic",
                                    optimizers="sgd:learning_rate=10.0,adamw",
                                    steps=40, checkpoint_every=2, eval_every=20, log_every=100))
  assert [r["optimizer"] for r in rows] == ["sgd:learning_rate=10.0", "adamw"]
  assert rows[0]["status"] == "diverged" and rows[0]["steps"] < 40
  assert rows[1]["status"] == "ok" and rows[1]["steps"] == 40
  evals = [r for r in _records(tmp_path) if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [0, 20, 40]
  assert rows[1]["eval_suboptimality"] == evals[-1]["suboptimality"] < 0.5 * evals[0]["suboptimality"]
  summary = (tmp_path / "summary.md").read_text()
  assert "sgd:learning_rate=10.0" in summary and "| adamw" in summary
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  ckpt_dir = tmp_path / "sgd_learning_rate=10.0" / "checkpoints"
  saved = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  for step in saved:  # whatever was saved is finite
    with ocp.CheckpointManager(ckpt_dir) as mngr:
      restored = mngr.restore(step)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(restored))


def test_metrics_cut_by_a_kill_are_dropped_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (1, 2, 3)]
  path.write_text("\n".join(lines) + '\n{"step": 4, "split": "tr')  # killed mid-write
  assert [r["step"] for r in runner._read_jsonl(str(path), upto_step=10)] == [1, 2, 3]
  assert [r["step"] for r in runner._read_jsonl(str(path), upto_step=2)] == [1, 2]


def test_checkpoints_round_trip_zero_size_leaves(tmp_path):
  """orbax refuses zero-size arrays; the runner rebuilds them (some optimizer states have them)."""
  mesh = jax.make_mesh((8,), ("data",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = ({"w": jax.device_put(np.arange(3.0, dtype=np.float32), sh)},
           (jax.device_put(np.zeros((0, 4), np.float32), sh), jax.device_put(np.int32(7), sh)))
  ckpt = runner.Checkpoints(str(tmp_path), keep=2)
  ckpt.save(5, state)
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  step, restored = runner.Checkpoints(str(tmp_path), keep=2).restore_latest(abstract)
  assert step == 5
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_algorithm_data_parallel_matches_plain_step(reference, tmp_path):
  """--algorithm=data_parallel (shard_map, exact mean) gives the runner's own losses."""
  ref_dir, _ = reference
  runner.run_experiment(_cfg(tmp_path, algorithm="data_parallel", steps=10, checkpoint_every=0))
  got = [r["loss"] for r in _records(tmp_path) if r["split"] == "train"]
  want = [r["loss"] for r in _records(ref_dir) if r["split"] == "train"][:10]
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_algorithm_run_resumes_identically(tmp_path):
  """A DiLoCo run stopped midway and rerun equals an uninterrupted one, bytes included.

  The delayed-scaling int8 reducer carries state that decides the next
  round's codes (per-block steps, worker and server error), so resuming
  without it would diverge."""
  cfg = dict(optimizers="sgd", learning_rate=0.1, steps=12, checkpoint_every=4,
             algorithm="diloco:sync_every=4:compressor=int8_delayed")
  runner.run_experiment(_cfg(tmp_path / "full", **cfg))
  runner.run_experiment(_cfg(tmp_path / "cut", stop_after_step=6, **cfg))
  runner.run_experiment(_cfg(tmp_path / "cut", **cfg))
  full, cut = _records(tmp_path / "full", "sgd"), _records(tmp_path / "cut", "sgd")
  assert full == cut
  sent = [r["comm_bytes"] for r in full if r["split"] == "train"]
  assert 0 < sent[0] < 4 * 64 * 128 / 4  # int8 every 4 steps: far below one f32 all-reduce


def test_self_communicating_optimizer_reports_its_bytes(tmp_path):
  """1-bit Adam runs across the 8 data replicas and reports nonzero bytes per step."""
  rows = runner.run_experiment(_cfg(tmp_path, optimizers="onebit_adam:freeze_step=2", steps=4,
                                    checkpoint_every=0))
  assert rows[0]["status"] == "ok" and rows[0]["comm_MB_per_step"] > 0


def test_unknown_algorithm_lists_valid_names(tmp_path):
  with pytest.raises(ValueError, match="unknown algorithm 'dilco'; valid algorithms are .*diloco"):
    runner.run_experiment(_cfg(tmp_path, algorithm="dilco"))


# --- adaptive batch size (AdAdaGrad) -----------------------------------------

ADAPTIVE = dict(task="digits_mlp:hidden=16", steps=8, batch_size=16, max_batch_size=64,
                batch_size_controller="adadagrad", adadagrad_eta=1.0, eval_every=0,
                checkpoint_every=4)


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("adaptive")
  runner.run_experiment(_cfg(workdir, **ADAPTIVE))
  return workdir


def test_adaptive_batch_size_follows_the_norm_test(adaptive_run):
  """b grows to the next bucket >= ceil(ratio * b) when the test fails (ratio > 1).

  norm_test_ratio = (sum_j s_j^2 / b) / (eta^2 ||g||^2), so the norm test's
  b* = ceil(ratio * b); buckets are 16 * 2**k capped at 64 (multiples of data=8).
  """
  train = [r for r in _records(adaptive_run) if r["split"] == "train"]
  sizes = [r["batch_size"] for r in train]
  assert sizes[0] == 16 and sizes[-1] > 16  # digits' per-example noise makes it grow
  for prev, nxt in zip(train, train[1:]):
    b, ratio = prev["batch_size"], prev["norm_test_ratio"]
    want = b
    if ratio > 1:
      b_star = math.ceil(ratio * b)
      want = next((s for s in (16, 32, 64) if s >= max(b, b_star)), 64)
    assert nxt["batch_size"] == want, (prev, nxt)
  assert runner.batch_size_buckets(16, 64) == (16, 32, 64)
  assert runner.batch_size_buckets(16, 40) == (16, 32, 40)


def test_adaptive_batch_size_resumes_with_its_controller_state(adaptive_run, tmp_path):
  runner.run_experiment(_cfg(tmp_path, stop_after_step=6, **ADAPTIVE))
  runner.run_experiment(_cfg(tmp_path, **ADAPTIVE))
  cut, full = _records(tmp_path), _records(adaptive_run)
  assert cut == full
  # Resumed from the step-4 checkpoint with a grown batch: a fresh controller would say 16.
  assert [r["batch_size"] for r in full if r["split"] == "train"][4] > 16


@pytest.mark.parametrize("override, pattern", [
    (dict(batch_size_controller="adagrad"), r"batch_size_controller='adagrad' is invalid; it must be '' \(a fixed batch size\) or one of adadagrad"),
    (dict(batch_size_controller="adadagrad", max_batch_size=60), r"max_batch_size=60 is invalid; .* a multiple of the mesh's data axis \(size 8\)"),
    (dict(batch_size_controller="adadagrad", adadagrad_eta=0.0), r"adadagrad_eta=0.0 is invalid; it must be > 0"),
    (dict(batch_size_controller="adadagrad", algorithm="diloco"), r"cannot be combined with --algorithm='diloco'"),
])
def test_adaptive_batch_size_bad_config(tmp_path, override, pattern):
  with pytest.raises(runner.UsageError, match=pattern):
    runner.run_experiment(_cfg(tmp_path, **override))


def test_lawa_is_evaluated_at_its_averaged_params(tmp_path):
  """The eval of lawa_adamw is that of the mean of the step-5 and step-10 iterates."""
  spec = "lawa_adamw:learning_rate=0.003:num_checkpoints=2:checkpoint_every=5"
  runner.run_experiment(_cfg(tmp_path, task="digits_mlp:hidden=16", optimizers=spec,
                             steps=10, eval_every=10, checkpoint_every=0))
  evals = [r for r in _records(tmp_path, runner._label_dir(spec)) if r["split"] == "eval"]
  task = tasks.get_task("digits_mlp", hidden=16)
  params = task.init(jax.random.key(0))
  tx = optax.adamw(3e-3, weight_decay=1e-4)  # LAWA trains the raw iterate with its base
  state = tx.init(params)
  step = jax.jit(lambda p, s, b: tx.update(jax.grad(task.loss)(p, b), s, p))
  iterates = []
  for i in range(10):
    updates, state = step(params, state, task.train_batch(i, 16, 0))
    params = optax.apply_updates(params, updates)
    iterates.append(params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, iterates[4], iterates[9])
  want = task.metrics(mean, task.eval_batch())
  raw = task.metrics(iterates[9], task.eval_batch())
  assert evals[-1]["step"] == 10
  np.testing.assert_allclose(evals[-1]["loss"], float(want["loss"]), rtol=1e-5)
  assert abs(float(raw["loss"]) - float(want["loss"])) > 1e-3  # the average is not the iterate
