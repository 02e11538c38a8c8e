"""gradax.moe: routers, capacity, dispatchers, aux losses, nnx layers, EP."""

from gradax.moe.capacity import apply_capacity, compute_capacity, drop_overflow, reroute_overflow, slot_positions
from gradax.moe.dispatch import DISPATCHERS, einsum_dispatch, get_dispatcher, loop_dispatch, sorted_dispatch
from gradax.moe.expert_parallel import expert_parallel_moe, sharding_rules
from gradax.moe.layers import MoE, PEER, product_key_topk
from gradax.moe.losses import load_balancing_loss, mutual_information_loss, router_z_loss, routing_metrics
from gradax.moe.routing import RoutingResult, expert_choice_routing, gshard_top2_routing, hash_routing, m6t_routing, router_logits, switch_routing, top_k_routing
