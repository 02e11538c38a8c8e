"""OASIS: doubly adaptive scaling with a Hutchinson Hessian diagonal.

Jahani, Rusakov, Shi, Richtárik, Mahoney & Takáč, "Doubly Adaptive Scaled
Algorithm for Machine Learning Using Second-Order Information", 2021 (ICLR
2022), arXiv 2109.05198.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from gradax.optimizers import _tree


class ScaleByOasisState(NamedTuple):
  """State of :func:`scale_by_oasis`.

  Attributes:
    count: steps taken, shape=(), int32; the probe of step k is drawn from
      `fold_in(key(seed), k)`, so no key is stored (and no key sharding can
      drift under an explicit mesh).
    diag: the Hessian-diagonal EMA :math:`D_k`, like params, float32.
    prev_params: :math:`w_{k-1}` (the params at the previous call).
    step_size: :math:`\\eta_{k-1}`, shape=(), float32.
    theta: :math:`\\theta_{k-1} = \\eta_{k-1}/\\eta_{k-2}` (inf at the start),
      shape=(), float32.
  """

  count: jax.Array
  diag: optax.Updates
  prev_params: optax.Params
  step_size: jax.Array
  theta: jax.Array


def _hutchinson(obj_fn, params, key):
  """One Rademacher probe: z * (H z), with H the Hessian of obj_fn."""
  z = optax.tree.random_like(key, params, jax.random.rademacher,
                             dtype=jnp.float32)
  z = jax.tree.map(lambda zi, p: zi.astype(jnp.asarray(p).dtype), z, params)
  hz = jax.jvp(jax.grad(obj_fn), (params,), (z,))[1]
  return jax.tree.map(
      lambda a, b: a.astype(jnp.float32) * b.astype(jnp.float32), z, hz)


def scale_by_oasis(
    init_step_size: float = 1e-2,
    b2: float = 0.99,
    alpha: float = 1e-2,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""OASIS: a Hutchinson-diagonal preconditioner and a Lipschitz step size.

  With :math:`z_k` a Rademacher vector and
  :math:`\|x\|_D^2 = x^\top D x`, :math:`\|x\|_{D}^{*2} = x^\top D^{-1} x`:

  .. math::
    D_k = \beta_2 D_{k-1} + (1-\beta_2)\, z_k \odot \nabla^2 F(w_k) z_k
      \quad (D_0 = z_0 \odot \nabla^2 F(w_0) z_0), \qquad
    \hat D_k = \max(|D_k|, \alpha), \\
    \eta_k = \min\Big\{\sqrt{1+\theta_{k-1}}\,\eta_{k-1},\;
      \frac{\|w_k - w_{k-1}\|_{\hat D_k}}
           {2\,\|\nabla F(w_k) - \nabla F(w_{k-1})\|^*_{\hat D_k}}\Big\},
      \quad \theta_k = \eta_k/\eta_{k-1}, \\
    u_k = \eta_k\, \hat D_k^{-1} \nabla F(w_k),

  with :math:`\eta_0` = `init_step_size` and :math:`\theta_0 = \infty`. The
  second term of the min is the inverse of a local Lipschitz estimate in the
  :math:`\hat D_k` geometry. Both gradients of the difference are taken on the
  current batch (the stochastic variant): :math:`\nabla F(w_{k-1})` is
  recomputed from `obj_fn`. When :math:`w_k = w_{k-1}` or the gradients agree,
  :math:`\eta` and :math:`\theta` are kept.

  `update` needs `params` and the keyword `obj_fn`, a function of the params
  alone returning the current batch's scalar loss (as for optax's sophia):
  `obj_fn = lambda p: loss(p, batch)`. One step costs a gradient, a
  Hessian-vector product and a gradient at :math:`w_{k-1}`.

  Jahani et al., "Doubly Adaptive Scaled Algorithm for Machine Learning Using
  Second-Order Information", 2021, arXiv 2109.05198.

  Args:
    init_step_size: :math:`\eta_0` > 0.
    b2: decay of the Hessian-diagonal EMA, in [0, 1).
    alpha: truncation level of :math:`|D_k|`, > 0. Too small a value lets
      near-zero curvature estimates blow the step up (1e-5 diverged on the
      built-in char_lm task; 1e-2 trains it).
    seed: seed of the Rademacher probes.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = optax.chain(gradax.optimizers.scale_by_oasis(), optax.scale(-1.0))
    u, state = tx.update(grads, state, params,
                         obj_fn=lambda p: loss(p, batch))
  """
  _tree.check_range("init_step_size", init_step_size, 0.0,
                    low_inclusive=False)
  _tree.check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  _tree.check_range("alpha", alpha, 0.0, low_inclusive=False)

  def init_fn(params):
    return ScaleByOasisState(
        count=jnp.zeros([], jnp.int32),
        diag=optax.tree.zeros_like(params, dtype=jnp.float32),
        prev_params=jax.tree.map(jnp.asarray, params),
        step_size=jnp.asarray(init_step_size, jnp.float32),
        theta=jnp.asarray(jnp.inf, jnp.float32),
    )

  def update_fn(updates, state, params=None, *, obj_fn=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("oasis needs params; got params=None.")
    if obj_fn is None:
      raise ValueError("oasis needs the keyword obj_fn (params -> loss); got "
                       "obj_fn=None.")
    sub = jax.random.fold_in(jax.random.key(seed), state.count)
    sample = _hutchinson(obj_fn, params, sub)
    first = state.count == 0
    diag = jax.tree.map(
        lambda d, s: jnp.where(first, s, b2 * d + (1 - b2) * s),
        state.diag, sample)
    dhat = jax.tree.map(lambda d: jnp.maximum(jnp.abs(d), alpha), diag)

    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    prev_grad = jax.grad(obj_fn)(state.prev_params)
    dw = jax.tree.map(jnp.subtract, f32(params), f32(state.prev_params))
    dg = jax.tree.map(jnp.subtract, f32(updates), f32(prev_grad))
    dw_norm = jnp.sqrt(optax.tree.sum(
        jax.tree.map(lambda d, x: d * x * x, dhat, dw)))
    dg_norm = jnp.sqrt(optax.tree.sum(
        jax.tree.map(lambda d, x: x * x / d, dhat, dg)))
    estimate = dw_norm / jnp.maximum(2.0 * dg_norm, 1e-30)
    estimate = jnp.where(dg_norm > 0, estimate, jnp.inf)
    bound = jnp.sqrt(1.0 + state.theta) * state.step_size
    eta = jnp.minimum(bound, estimate)
    keep = (dw_norm <= 0) | ~jnp.isfinite(eta) | (eta <= 0)
    step_size = jnp.where(keep, state.step_size, eta)
    theta = jnp.where(keep, state.theta, eta / state.step_size)

    new_updates = jax.tree.map(
        lambda g, d: (step_size * g.astype(jnp.float32) / d).astype(g.dtype),
        updates, dhat)
    return new_updates, ScaleByOasisState(
        count=numerics.safe_int32_increment(state.count),
        diag=diag,
        prev_params=jax.tree.map(
            lambda p, q: jnp.asarray(p).astype(q.dtype), params,
            state.prev_params),
        step_size=step_size.astype(jnp.float32),
        theta=theta.astype(jnp.float32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def oasis(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    init_step_size: float = 1e-2,
    b2: float = 0.99,
    alpha: float = 1e-2,
    seed: int = 0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""OASIS (see :func:`scale_by_oasis`); `learning_rate` scales its step.

  :math:`w_{k+1} = w_k - \gamma_k(\eta_k \hat D_k^{-1}\nabla F(w_k) +
  \lambda w_k)`, where :math:`\eta_k` is OASIS's own adaptive step and
  :math:`\gamma_k` = `learning_rate` (1.0 is the paper's method). Pass
  `obj_fn=lambda p: loss(p, batch)` to `update`.

  Jahani et al., "Doubly Adaptive Scaled Algorithm for Machine Learning Using
  Second-Order Information", 2021, arXiv 2109.05198.

  Args:
    learning_rate: multiplier :math:`\gamma_k` of the adaptive step.
    init_step_size: :math:`\eta_0` > 0.
    b2: decay of the Hessian-diagonal EMA, in [0, 1).
    alpha: truncation level of the diagonal, > 0.
    seed: seed of the Rademacher probes.
    weight_decay: decoupled weight decay >= 0.
    mask: optional weight-decay mask.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example::

    tx = gradax.optimizers.oasis()
    u, state = tx.update(grads, state, params,
                         obj_fn=lambda p: loss(p, batch))
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      scale_by_oasis(init_step_size=init_step_size, b2=b2, alpha=alpha,
                     seed=seed),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
