"""``moe_lm``: the ``char_lm`` transformer with MoE feed-forward layers.

Every block's FFN is a ``gradax.moe.MoE`` layer. By default the MoE has the
same *active* parameters per token as char_lm's dense FFN (d -> 4d -> d,
8 d^2 weights): E = 8 experts, k = 2, expert width h = 4d / k = 2d, so each
token runs k * 2 d h = 8 d^2 expert weights (plus the d x E router), while the
layer holds E / k = 4x the dense FFN's parameters. The task loss adds
``aux_weight`` x (the layers' ``0.01 * load-balancing + 0.001 * z-loss``).

  task = gradax.experiments.tasks.get_task("moe_lm", num_experts=16)
"""

from __future__ import annotations

import jax
from flax import nnx

from gradax.experiments import tasks
from gradax.moe import layers

DEFAULTS = {
    # transformer (as char_lm)
    "d_model": 64, "num_layers": 2, "num_heads": 4, "seq_len": 64,
    "aux_weight": 1.0,
    # MoE
    "num_experts": 8, "k": 2, "expert_hidden": None, "router": "top_k",
    "softmax_order": "softmax_topk", "renormalize": True,
    "capacity_factor": None, "dispatch": "sorted", "num_shared_experts": 0,
    "load_balancing_weight": 1e-2, "z_loss_weight": 1e-3,
}


class MoEFFN(nnx.Module):
  """Adapts ``MoE`` to the char_lm FFN interface: ``x -> (y, aux_loss)``."""

  def __init__(self, d_model, rngs, **moe_kwargs):
    self.moe = layers.MoE(d_model, rngs=rngs, **moe_kwargs)

  def __call__(self, x):
    y, aux = self.moe(x)
    return y, aux["loss"]


def moe_ffn_factory(**moe_kwargs):
  """``ffn(d_model, rngs)`` for ``tasks.make_char_lm`` building ``MoEFFN``."""
  return lambda d_model, rngs: MoEFFN(d_model, rngs, **moe_kwargs)


def make_moe_lm(**overrides) -> tasks.Task:
  """Byte-level LM with MoE FFNs; headline ``bpc`` (lower is better).

  Options (defaults in ``DEFAULTS``): the char_lm sizes ``d_model``,
  ``num_layers``, ``num_heads``, ``seq_len``, ``aux_weight``; and the MoE's
  ``num_experts``, ``k``, ``expert_hidden`` (None: 4 d_model / k, equal
  active parameters to char_lm), ``router``, ``softmax_order``,
  ``renormalize``, ``capacity_factor`` (None: dropless), ``dispatch``,
  ``num_shared_experts``, ``load_balancing_weight``, ``z_loss_weight``.

  Returns:
    A ``Task`` named "moe_lm"; ``metrics`` reports ``loss`` (cross-entropy +
    aux), ``bpc`` and ``aux_loss``.
  """
  opts = tasks._check_overrides("moe_lm", overrides, DEFAULTS)  # pylint: disable=protected-access
  hidden = opts["expert_hidden"]
  if hidden is None:
    if (4 * opts["d_model"]) % opts["k"]:
      raise ValueError(
          f"task 'moe_lm': 4 * d_model = {4 * opts['d_model']} is not divisible "
          f"by k={opts['k']}; pass expert_hidden explicitly.")
    hidden = 4 * opts["d_model"] // opts["k"]
  ffn = moe_ffn_factory(
      hidden_dim=hidden, num_experts=opts["num_experts"], k=opts["k"],
      router=opts["router"], softmax_order=opts["softmax_order"],
      renormalize=opts["renormalize"],
      capacity_factor=opts["capacity_factor"], dispatch=opts["dispatch"],
      num_shared_experts=opts["num_shared_experts"],
      activation=jax.nn.gelu,
      load_balancing_weight=opts["load_balancing_weight"],
      z_loss_weight=opts["z_loss_weight"])
  return tasks.make_char_lm(
      ffn=ffn, name="moe_lm", d_model=opts["d_model"],
      num_layers=opts["num_layers"], num_heads=opts["num_heads"],
      seq_len=opts["seq_len"], aux_weight=opts["aux_weight"])
