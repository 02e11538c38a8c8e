"""Default experiment: AdamW against the gradax optimizers on char_lm.

``make run`` uses this file::

  python -m gradax.experiments.run --config=experiments/configs/default.py \
      --config.steps=300 --optimizer=adamw,shampoo:block_size=64

Adding an optimizer to the default comparison: add ONE line to ``OPTIMIZERS``
(a spec string, see ``gradax.experiments.run`` for the ``name:key=value``
syntax) and ONE line to ``LEARNING_RATES`` with its tuned per-task learning
rates. Names are looked up in ``gradax.optimizers`` first, then ``optax``.
"""

import ml_collections

# The optimizers compared by default, one spec per line.
OPTIMIZERS = (
    "adamw",
    # Memory-efficient optimizers (ranks fit char_lm's d_model=64; gaps suit
    # a few hundred steps).
    "microadam",
    "frugal:density=0.25:update_gap=50",
    "apollo:rank=8:update_proj_gap=50",
    "apollo_mini:update_proj_gap=200:vector_mode=apollo",
    "subset_norm_subspace_momentum:rank=8:update_proj_gap=50",
    "grass:rank=16:update_proj_gap=50:selection=top_norm",
    "natural_galore:rank=16:update_proj_gap=50:damping=1e-2",
    # Shampoo (grafted to Adam with a factored second moment, roots every 10
    # steps) and SOAP.
    "shampoo:precondition_every=10",
    "soap:precondition_every=10",
    # 1-bit Adam: freeze_step at 15% of the default 200 steps. The runner's
    # plain jitted step gives it one replica (axis_name=None): it reports
    # comm_bytes = 0 until the runner uses gradax.distributed.data_parallel.
    "onebit_adam:freeze_step=30",
)

# Tuned learning rates: optimizer name -> {task name -> learning rate}.
# A missing (optimizer, task) pair falls back to DEFAULT_LEARNING_RATE with a
# warning. One line per optimizer.
LEARNING_RATES = {
    "adamw": {"char_lm": 3e-3, "digits_mlp": 3e-3, "quadratic": 0.1, "rosenbrock": 0.02},
    "microadam": {"char_lm": 5e-3, "digits_mlp": 1e-2},
    "frugal": {"char_lm": 3e-3, "digits_mlp": 3e-3},
    "apollo": {"char_lm": 3e-2, "digits_mlp": 1e-1},
    "apollo_mini": {"char_lm": 1e-2, "digits_mlp": 1e-1},
    "subset_norm_subspace_momentum": {"char_lm": 3e-2, "digits_mlp": 1e-1},
    "grass": {"char_lm": 1e-2, "digits_mlp": 2e-2},
    "natural_galore": {"char_lm": 1e-2, "digits_mlp": 2e-2},
    "shampoo": {"char_lm": 1e-2, "digits_mlp": 1e-2, "quadratic": 0.1, "rosenbrock": 0.02},
    "soap": {"char_lm": 1e-2, "digits_mlp": 1e-2, "quadratic": 0.1, "rosenbrock": 0.02},
    "onebit_adam": {"char_lm": 3e-3, "digits_mlp": 3e-3, "quadratic": 0.1, "rosenbrock": 0.02},
}

DEFAULT_LEARNING_RATE = 1e-3


def get_config() -> ml_collections.ConfigDict:
  """The default configuration (every runner field lives here)."""
  c = ml_collections.ConfigDict()
  c.task = "char_lm"            # "name" or "name:option=value:..."
  c.optimizers = ",".join(OPTIMIZERS)  # comma-separated optimizer specs
  c.steps = 200
  c.batch_size = 16             # global batch (the initial one when adaptive)
  # Adaptive global batch size: "" = fixed; "adadagrad" = AdAdaGrad's norm test
  # (gradax.optimizers.adadagrad_controller), sizes batch_size * 2**k <= max_batch_size.
  c.batch_size_controller = ""
  c.adadagrad_eta = 0.5         # norm-test tolerance (larger: more noise allowed)
  c.max_batch_size = 1024       # cap of the adaptive batch (a multiple of the data axis)
  c.learning_rate = 0.0         # > 0 overrides the table for every optimizer
  c.learning_rates = {k: dict(v) for k, v in LEARNING_RATES.items()}
  c.default_learning_rate = DEFAULT_LEARNING_RATE
  c.seed = 0
  c.mesh = "data=-1"            # all devices on the data axis
  c.algorithm = ""              # gradax.distributed algorithm spec; "" = plain data parallel
  c.num_cpu_devices = 8         # CPU backend devices (0: leave JAX's default)
  c.workdir = "runs/default"
  c.log_every = 10
  c.eval_every = 50
  c.checkpoint_every = 100      # 0 disables checkpoints
  c.keep_checkpoints = 2
  c.progress = True
  c.stop_after_step = 0         # > 0: stop there as if killed (for resume tests)
  return c
