"""gradax: a JAX research library of optimizers and training algorithms.

Subpackages:
  optimizers:  optax-compatible optimizers (Shampoo, 1-bit Adam, error feedback, ...).
  distributed: meshes, sharding rules, compressors, compressed collectives, DiLoCo, ...
  federated:   federated algorithms as pure functions, client simulation, Flower adapter.
  moe:         routers, dispatchers, aux losses, flax nnx MoE layers, expert parallelism.
  experiments: the absl runner, built-in tasks and the benchmark harness.
"""

__version__ = "0.1.0"

from gradax import distributed
from gradax import optimizers
from gradax import federated
from gradax import moe

__all__ = ["distributed", "optimizers", "federated", "moe", "__version__"]
