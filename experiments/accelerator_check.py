"""Shampoo and SOAP on an accelerator: precision, agreement with CPU, speed.

One prepared script for a short lease of a GPU (or TPU) machine. It prints
each section as it finishes and rewrites ``<out>/accelerator_check.json``
after each, so a run cut short keeps what it measured.

Sections:

1. ``matmul_precision``: relative error of a float32 matmul against float64
   at JAX's default precision and at ``HIGHEST``. On NVIDIA GPUs since
   Ampere the default is TF32 (about 3e-4 here), which is why
   ``matrix_roots`` asks for ``HIGHEST`` everywhere.
2. ``roots``: ``inverse_pth_root`` (eigh and coupled Newton, p = 4) of
   ill-conditioned SPD matrices against a float64 closed form, on the
   accelerator and on the host CPU.
3. ``agreement``: 12 ``char_lm`` steps of AdamW, Shampoo (both root
   methods) and SOAP on the accelerator and on the CPU, with every model
   matmul in float32; the relative parameter difference. SOAP's is large by
   nature: early statistics are rank-deficient, so the eigenbasis inside
   their null space is arbitrary (it differs between LAPACK and cuSOLVER)
   and Adam is not rotation-invariant. A 1e-6 perturbation of the initial
   params moves SOAP's 12-step params by ~4% on CPU alone.
4. ``root_refresh``: wall time of one batched root refresh of 64 and 512
   128x128 factors.
5. ``speed``: step and compile time of a 10-step ``lax.scan`` (one root
   refresh) for each optimizer against AdamW, on ``char_lm`` at the default
   size and, unless ``--quick``, at d_model 512 and 1024.

Seen on one NVIDIA H200 (jax 0.11.2, 2026-11-30, an earlier draft of this
script): default-precision matmul error 2.9e-4, HIGHEST 8.1e-7. Newton
roots at default precision (the code before ``matrix_roots`` asked for
HIGHEST) ran into the 100-iteration cap with a 2.4e-2 error at condition
1e4 and were rejected as failed at 1e6; with HIGHEST: 13 and 17
iterations, errors 9.4e-6 and 3.9e-4, like the CPU. Agreement with CPU:
AdamW 1.0e-4, Shampoo Newton 1.2e-4, eigh 6.0e-4, SOAP 9.3e-2. Root
refresh of 512 factors: Newton 5.7 ms, eigh 3.7 ms (CPU: 3.4 s, 0.64 s).
Step time vs AdamW (ms): default size 0.49 / Shampoo 1.01 (2.06x, launch
bound); d512 11.2 / 14.6 (1.30x; eigh 1.18x, SOAP 1.52x); d1024 28.1 /
40.0 (1.42x; eigh 1.26x). Compile time: 0.7-1.0x AdamW's on the GPU.

Usage::

  python -m gradax.experiments.accelerator_check --out results/gpu
  python -m gradax.experiments.accelerator_check --out /tmp/x --quick  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradax.experiments import benchlib
from gradax.experiments import tasks as tasks_lib
from gradax.optimizers import matrix_roots
from gradax.optimizers import shampoo, soap

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(3e-3),
    "shampoo_newton": lambda: shampoo(3e-3, precondition_every=10),
    "shampoo_eigh": lambda: shampoo(3e-3, precondition_every=10, root_method="eigh"),
    "soap": lambda: soap(3e-3, precondition_every=10),
}
TINY_CHAR_LM = dict(d_model=16, num_layers=1, num_heads=2, seq_len=16)


def random_spd(n: int, cond: float, seed: int):
  """``(A, Q, w)`` with ``A = Q diag(w) Qᵀ``, eigenvalues log-spaced in ``[1/cond, 1]``."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  w = np.logspace(0, -np.log10(cond), n)
  return (q * w) @ q.T, q, w


def _relative_error(x, ref) -> float:
  x = np.asarray(x, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def matmul_precision(quick: bool) -> dict[str, float]:
  """Section 1: float32 matmul error vs float64, at default and HIGHEST precision."""
  n = 256 if quick else 2048
  rng = np.random.default_rng(0)
  a, b = (rng.normal(size=(n, n)).astype(np.float32) for _ in range(2))
  ref = a.astype(np.float64) @ b.astype(np.float64)
  out = {}
  for name, precision in (("default", None), ("highest", jax.lax.Precision.HIGHEST)):
    product = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p))(a, b)
    out[name] = _relative_error(product, ref)
  return out


def roots(quick: bool, accelerator, cpu) -> dict[str, Any]:
  """Section 2: inverse 4th roots on ``accelerator`` and ``cpu`` vs a float64 closed form."""
  p, eps = 4, 1e-6
  cases = [(32, 1e4)] if quick else [(128, 1e4), (128, 1e6), (512, 1e4)]
  out = {}
  for n, cond in cases:
    a, q, w = random_spd(n, cond, n)
    ref = (q * (w + eps * w.max()) ** (-1.0 / p)) @ q.T
    for method in matrix_roots.METHODS:
      fn = jax.jit(lambda x, m=method: matrix_roots.inverse_pth_root(
          x, p, method=m, ridge_epsilon=eps))
      for where, device in (("accelerator", accelerator), ("cpu", cpu)):
        r = fn(jax.device_put(jnp.asarray(a[None], jnp.float32), device))
        out[f"n{n}_cond{cond:.0e}_{method}_{where}"] = {
            "rel_error_vs_f64": _relative_error(r.root[0], ref),
            "ok": bool(r.ok[0]), "newton_iterations": int(r.iterations)}
  return out


def _batches(task, steps: int, batch_size: int):
  return benchlib.stack_batches([task.train_batch(t, batch_size, 0) for t in range(steps)])


def agreement(quick: bool, accelerator, cpu) -> dict[str, Any]:
  """Section 3: params after 12 char_lm steps on ``accelerator`` vs ``cpu``, per optimizer."""
  task = tasks_lib.get_task("char_lm", **(TINY_CHAR_LM if quick else {}))
  batches = _batches(task, 12, 16)
  out = {}
  with jax.default_matmul_precision("float32"):
    for name, make in OPTIMIZERS.items():
      final = {}
      for where, device in (("accelerator", accelerator), ("cpu", cpu)):
        with jax.default_device(device):
          params = task.init(jax.random.key(0))
          tx = make()
          (p, _), losses = benchlib.train_scan(task.loss, tx)(params, tx.init(params), batches)
          final[where] = (jax.device_get(p), float(losses[-1]))
      flat = [np.concatenate([np.ravel(np.asarray(x, np.float64))
                              for x in jax.tree.leaves(final[w][0])])
              for w in ("accelerator", "cpu")]
      out[name] = {"param_rel_diff": _relative_error(flat[0], flat[1]),
                   "final_loss_accelerator": final["accelerator"][1],
                   "final_loss_cpu": final["cpu"][1]}
  return out


def root_refresh(quick: bool) -> dict[str, float]:
  """Section 4: milliseconds per batched root refresh, per method."""
  out = {}
  for count in ((4,) if quick else (64, 512)):
    n = 16 if quick else 128
    a = jnp.asarray(np.stack([random_spd(n, 1e4, i)[0] for i in range(count)]),
                    jnp.float32)
    for method in matrix_roots.METHODS:
      fn = jax.jit(lambda x, m=method: matrix_roots.inverse_pth_root(x, 4, method=m).root)
      out[f"{count}x{n}_{method}_ms"] = 1e3 * benchlib.median_time(
          fn, a, warmup=1, repeats=5)
  return out


def speed(task_options: dict[str, int], batch_size: int) -> dict[str, Any]:
  """Section 5: step and compile time of a 10-step scan per optimizer, and ratios to AdamW."""
  task = tasks_lib.get_task("char_lm", **task_options)
  params = task.init(jax.random.key(0))
  batches = _batches(task, 10, batch_size)
  out: dict[str, Any] = {"params": int(sum(x.size for x in jax.tree.leaves(params)))}
  for name, make in OPTIMIZERS.items():
    tx = make()
    state = tx.init(params)
    # One step first: SOAP's first step only builds its bases.
    g = jax.grad(task.loss)(params, task.train_batch(0, batch_size, 0))
    _, state = jax.jit(tx.update)(g, state, params)
    fn = benchlib.train_scan(task.loss, tx)
    start = time.perf_counter()
    compiled = fn.lower(params, state, batches).compile()
    compile_s = time.perf_counter() - start
    step_s = benchlib.median_time(compiled, params, state, batches, warmup=1,
                                  repeats=5) / 10
    out[name] = {"step_ms": 1e3 * step_s, "compile_s": compile_s}
  for name in OPTIMIZERS:
    out[name]["step_vs_adamw"] = out[name]["step_ms"] / out["adamw"]["step_ms"]
    out[name]["compile_vs_adamw"] = out[name]["compile_s"] / out["adamw"]["compile_s"]
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gradax.experiments.accelerator_check",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for accelerator_check.json")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  accelerator, cpu = jax.devices()[0], jax.devices("cpu")[0]
  results: dict[str, Any] = {"env": {
      "jax": jax.__version__, "backend": jax.default_backend(),
      "device": getattr(accelerator, "device_kind", str(accelerator))}}
  sizes = [("char_lm_tiny_b8", TINY_CHAR_LM, 8)] if args.quick else [
      ("char_lm_default_b32", {}, 32),
      ("char_lm_d512_l4_s256_b64",
       dict(d_model=512, num_layers=4, num_heads=8, seq_len=256), 64),
      ("char_lm_d1024_l4_s256_b64",
       dict(d_model=1024, num_layers=4, num_heads=16, seq_len=256), 64)]
  sections = [("matmul_precision", lambda: matmul_precision(args.quick)),
              ("roots", lambda: roots(args.quick, accelerator, cpu)),
              ("agreement", lambda: agreement(args.quick, accelerator, cpu)),
              ("root_refresh", lambda: root_refresh(args.quick))]
  sections += [(f"speed_{name}", lambda o=options, b=batch: speed(o, b))
               for name, options, batch in sizes]
  start = time.time()
  for name, section in sections:
    results[name] = section()
    print(f"[{time.time() - start:6.1f} s] {name}: {json.dumps(results[name])}", flush=True)
    with open(os.path.join(args.out, "accelerator_check.json"), "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
