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
    BatchSizeController, adagrad_norm, scale_by_adagrad_norm,
    ScaleByAdagradNormState)

# Memory-efficient optimizers.
from gradax.optimizers.microadam import (
    microadam, scale_by_microadam, MicroAdamState)
from gradax.optimizers.frugal import frugal, scale_by_frugal, FrugalState
from gradax.optimizers.apollo import (
    apollo, apollo_mini, scale_by_apollo, ApolloState)
from gradax.optimizers.subset_norm import (
    subset_norm_adagrad, subspace_momentum, subset_norm_subspace_momentum,
    scale_by_subset_norm, scale_by_subspace_momentum,
    scale_by_subset_norm_subspace_momentum, SubsetNormState)
from gradax.optimizers.grass import grass, scale_by_grass, GrassState
from gradax.optimizers.natural_galore import (
    natural_galore, scale_by_natural_galore, scale_by_woodbury_fisher,
    WoodburyFisherState)

# Shampoo, SOAP and inverse matrix roots.
from gradax.optimizers.matrix_roots import (
    inverse_pth_root, safe_inverse_pth_root, RootResult)
from gradax.optimizers.shampoo import (
    shampoo, scale_by_shampoo, ShampooState, SHAMPOO_STATIC_ARGS)

# Error feedback and 1-bit optimizers (communication compression).
from gradax.optimizers.error_feedback import (
    error_feedback, ef21, econtrol, ErrorFeedbackState, EF21State,
    EControlState)
from gradax.optimizers.onebit_adam import (
    onebit_adam, scale_by_onebit_adam, OnebitAdamState)
from gradax.optimizers.soap import soap, scale_by_soap, SoapState, SOAP_STATIC_ARGS
from gradax.optimizers.zero_one_adam import zero_one_adam, ZeroOneAdamState
from gradax.optimizers.onebit_lamb import onebit_lamb, OnebitLambState
