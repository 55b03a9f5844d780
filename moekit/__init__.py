"""moekit: sparse Mixture-of-Experts layers and models in PyTorch."""

from moekit.config import MoEConfig
from moekit.moe import MoELayer, MoEOutput, RoutingStats, reference_forward, update_expert_biases

__version__ = "0.1.0"

__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "RoutingStats", "reference_forward", "update_expert_biases",
           "__version__"]
