"""gradax.distributed: meshes, sharding rules, compressors and compressed collectives."""

from gradax.distributed.mesh import KNOWN_AXES, make_mesh, parse_mesh_spec

# Sharding rules, data-parallel steps and local-update algorithms.
from gradax.distributed import sharding
from gradax.distributed.sharding import ShardingPlan, zero_plan
from gradax.distributed.data_parallel import (
    DataParallelState, Reducer, TrainAlgorithm, compressed_reducer,
    data_parallel, mean_reducer, robust_reducer)
from gradax.distributed.local_sgd import LocalUpdateState, local_sgd
from gradax.distributed.diloco import diloco
