from moekit.moe.dispatch import DispatchPlan, plan_expert_choice, plan_token_choice
from moekit.moe.experts import Experts
from moekit.moe.layer import MoELayer, MoEOutput, RoutingStats, update_expert_biases
from moekit.moe.losses import load_balancing_loss, router_entropy_loss, router_z_loss, sequence_balance_loss
from moekit.moe.reference import reference_forward
from moekit.moe.replay import RoutingReplay, routing_replay
from moekit.moe.routers import RouterOutput, build_router

__all__ = [
    "DispatchPlan", "Experts", "MoELayer", "MoEOutput", "RouterOutput", "RoutingReplay", "RoutingStats",
    "build_router", "load_balancing_loss", "plan_expert_choice", "plan_token_choice", "reference_forward",
    "router_entropy_loss", "router_z_loss", "routing_replay", "sequence_balance_loss", "update_expert_biases",
]
