"""gradax.optimizers."""

# Accelerated optimizers, weight averaging, schedules and batch-size control.
from gradax.optimizers.grams import grams, scale_by_grams, ScaleByGramsState
from gradax.optimizers.optimistic_amsgrad import (
    optimistic_amsgrad, scale_by_optimistic_amsgrad,
    ScaleByOptimisticAmsgradState)
from gradax.optimizers.lawa import lawa, lawa_adamw, lawa_eval_params, LawaState
from gradax.optimizers.multi_momentum import (
    multi_momentum, scale_by_multi_momentum, per_cluster_grads,
    ScaleByMultiMomentumState)
from gradax.optimizers.oasis import oasis, scale_by_oasis, ScaleByOasisState
from gradax.optimizers.clipped_sgd import (
    clipped_sgd, scale_by_clipped_sgd, ScaleByClippedSgdState)
from gradax.optimizers.schedules import (
    one_cycle_schedule, one_cycle_momentum_schedule,
    linear_scaled_learning_rate, epochs_to_steps,
    linear_scaling_warmup_schedule, warmup_stable_decay_schedule,
    inverse_sqrt_schedule)
from gradax.optimizers.adadagrad import (
    adadagrad_controller, per_example_grad_stats, norm_test,
    batch_size_for_next_step, GradStats, AdaptiveBatchState,
    BatchSizeController)
