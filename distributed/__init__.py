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
from gradax.distributed.demo import demo, scale_by_demo
from gradax.distributed.just_one_byte import just_one_byte
from gradax.distributed.streaming_diloco import streaming_diloco
from gradax.distributed.eager_updates import eager_diloco
from gradax.distributed.co2 import co2
from gradax.distributed import algorithms
from gradax.distributed.algorithms import ALGORITHMS
from gradax.distributed import robust
from gradax.distributed.robust import (
    coordinate_median, flag_aggregator, krum, trimmed_mean)
from gradax.distributed import stragglers
from gradax.distributed.stragglers import (
    DynamicBackupWorkers, GradientCode, TimeModel)
from gradax.distributed.compressors import (
    Compressor, cast, fixed_point, identity, int8, int_quantize, onebit, qsgd,
    rand_k, scaled_sign, terngrad, top_k)
from gradax.distributed.delayed_scaling import (
    DelayedScalingState, delayed_scaling_reducer)
from gradax.distributed.powersgd import powersgd
from gradax.distributed.dct import dct_topk
from gradax.distributed.collectives import (
    PmeanState, as_varying, axis_size, compressed_pmean,
    compressed_pmean_init, is_bound)
from gradax.distributed.comm_bytes import (
    CommBytes, comm_bytes, hlo_collectives, jaxpr_collectives)
