"""Multi-momentum variance reduction: one momentum buffer per data cluster.

Tondji, Kashubin & Cisse, "Variance Reduction in Deep Learning: More Momentum
is All You Need", 2021, arXiv 2111.11828 (after Yuan et al., "Cover: a
cluster-based variance reduced method for online learning", 2019).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from gradax.optimizers import _tree


class ScaleByMultiMomentumState(NamedTuple):
  """State of :func:`scale_by_multi_momentum`."""

  count: jax.Array  # shape=(), dtype=jnp.int32
  momenta: optax.Updates  # like params, each leaf with a leading axis K


def _check_num_clusters(num_clusters):
  if _tree.is_concrete_number(num_clusters) and (
      float(num_clusters) != int(num_clusters) or int(num_clusters) < 1):
    raise ValueError("num_clusters must be an integer >= 1; got "
                     f"num_clusters={num_clusters!r}.")


def scale_by_multi_momentum(
    num_clusters: int,
    momentum: float = 0.9,
    cluster_weights: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Per-cluster heavy-ball momenta, combined with the clusters' weights.

  The data are split into K clusters (e.g. class labels or k-means groups)
  with weights :math:`p_k` (their share of the data, :math:`\sum p_k = 1`).
  Each cluster keeps its own momentum; a step refreshes only the clusters
  present in the mini-batch, with their own mean gradient
  :math:`g_{t,k}`, and moves along the weighted sum:

  .. math::
    d_{t,k} = \begin{cases} \beta d_{t-1,k} + g_{t,k} & k \in B_t \\
      d_{t-1,k} & \text{otherwise} \end{cases}, \qquad
    u_t = \sum_{k=1}^K p_k\, d_{t,k}.

  Stale clusters keep contributing their last momentum, a SAG-like control
  variate across clusters that removes the between-cluster part of the
  gradient noise. If every cluster is present at every step with the same
  gradient, this is heavy-ball momentum (`optax.sgd(momentum=β)`).

  Extra keyword arguments of `update`:

  * `cluster_grads`: a pytree like the params with a leading axis K, the mean
    gradient of each cluster in the batch (see :func:`per_cluster_grads`);
  * `cluster_mask`: shape (K,), which clusters are present (bool, or the
    counts of examples per cluster); default all.

  Without `cluster_grads`, every present cluster gets the incoming gradient.

  Tondji, Kashubin & Cisse, "Variance Reduction in Deep Learning: More
  Momentum is All You Need", 2021, arXiv 2111.11828.

  Args:
    num_clusters: K >= 1.
    momentum: :math:`\beta` in [0, 1).
    cluster_weights: shape (K,), non-negative, summing to 1; default uniform.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = optax.chain(scale_by_multi_momentum(10), optax.scale(-0.1))
    cg, counts = per_cluster_grads(loss, params, batch, batch["label"], 10)
    u, state = tx.update(grads, state, params, cluster_grads=cg,
                         cluster_mask=counts)
  """
  _check_num_clusters(num_clusters)
  _tree.check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
  if cluster_weights is not None and not isinstance(
      cluster_weights, jax.core.Tracer):
    w = np.asarray(cluster_weights, np.float64)
    if (_tree.is_concrete_number(num_clusters)
        and w.shape != (int(num_clusters),)) or np.any(w < 0) or not np.isclose(
            w.sum(), 1.0, atol=1e-5):
      raise ValueError(
          "cluster_weights must have shape (num_clusters,), be >= 0 and sum "
          f"to 1; got cluster_weights={cluster_weights!r}.")

  def init_fn(params):
    k = int(num_clusters)
    return ScaleByMultiMomentumState(
        count=jnp.zeros([], jnp.int32),
        momenta=_tree.stacked_zeros_like(params, k),
    )

  def update_fn(updates, state, params=None, *, cluster_grads=None,
                cluster_mask=None, **extra_args):
    del params, extra_args
    k = jax.tree.leaves(state.momenta)[0].shape[0]
    if cluster_weights is None:
      weights = jnp.full((k,), 1.0 / k, jnp.float32)
    else:
      weights = jnp.asarray(cluster_weights, jnp.float32)
    if cluster_mask is None:
      present = jnp.ones((k,), bool)
    else:
      present = jnp.asarray(cluster_mask) > 0
    if cluster_grads is None:
      cluster_grads = jax.tree.map(
          lambda g: jnp.broadcast_to(g, (k,) + g.shape), updates)

    def leaf(d, gk, g):
      shape = (k,) + (1,) * g.ndim
      new = momentum * d + gk.astype(d.dtype)
      d = jnp.where(present.reshape(shape), new, d)
      u = jnp.sum(weights.reshape(shape) * d.astype(jnp.float32), axis=0)
      return u.astype(g.dtype), d

    out = jax.tree.map(leaf, state.momenta, cluster_grads, updates)
    new_updates = jax.tree.map(lambda _, o: o[0], updates, out)
    momenta = jax.tree.map(lambda _, o: o[1], updates, out)
    count = numerics.safe_int32_increment(state.count)
    return new_updates, ScaleByMultiMomentumState(count=count, momenta=momenta)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def multi_momentum(
    learning_rate: optax.ScalarOrSchedule,
    num_clusters: int = 1,
    momentum: float = 0.9,
    cluster_weights: Any | None = None,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with multi-momentum variance reduction (see
  :func:`scale_by_multi_momentum`).

  :math:`x_{t+1} = x_t - \eta_t(\sum_k p_k d_{t,k} + \lambda x_t)`.
  Tondji, Kashubin & Cisse, "Variance Reduction in Deep Learning: More
  Momentum is All You Need", 2021, arXiv 2111.11828.

  Args:
    learning_rate: a scalar or schedule :math:`\eta_t`.
    num_clusters: K >= 1.
    momentum: :math:`\beta` in [0, 1).
    cluster_weights: shape (K,) weights summing to 1; default uniform.
    weight_decay: decoupled weight decay >= 0.
    mask: optional weight-decay mask.

  Returns:
    An `optax.GradientTransformationExtraArgs`; pass `cluster_grads` and
    `cluster_mask` to `update`.

  Example::

    tx = gradax.optimizers.multi_momentum(0.05, num_clusters=10)
    u, state = tx.update(grads, state, params, cluster_grads=cg,
                         cluster_mask=counts)
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      scale_by_multi_momentum(num_clusters, momentum, cluster_weights),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def per_cluster_grads(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    cluster_ids: jax.Array,
    num_clusters: int,
) -> tuple[Any, jax.Array]:
  """Mean gradient of each cluster in a batch, from per-example gradients.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar` mean loss.
    params: the parameters.
    batch: pytree of arrays with a leading example axis b.
    cluster_ids: int array (b,), the cluster of each example, in [0, K).
    num_clusters: K.

  Returns:
    `(grads, counts)`: `grads` like params with a leading axis K (zero for
    clusters absent from the batch) and `counts` (K,) int32 examples per
    cluster, to pass as `cluster_grads` and `cluster_mask`.

  Example::

    cg, counts = per_cluster_grads(task.loss, params, batch, batch["y"], 10)
  """
  ex = _tree.per_example_grads(loss_fn, params, batch)
  ids = jnp.asarray(cluster_ids, jnp.int32)
  counts = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_clusters)
  denom = jnp.maximum(counts, 1).astype(jnp.float32)

  def seg(g):
    s = jax.ops.segment_sum(g.astype(jnp.float32), ids, num_clusters)
    return (s / denom.reshape((-1,) + (1,) * (g.ndim - 1))).astype(g.dtype)

  return jax.tree.map(seg, ex), counts.astype(jnp.int32)
