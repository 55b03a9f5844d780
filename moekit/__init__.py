"""moekit: sparse Mixture-of-Experts layers and models in PyTorch."""

from moekit.config import MoEConfig, ModelConfig
from moekit.generate import generate
from moekit.interop import from_pretrained
from moekit.model import ModelOutput, MoETransformer, count_parameters
from moekit.moe import MoELayer, MoEOutput, RoutingStats, reference_forward, update_expert_biases

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ModelOutput", "MoEConfig", "MoELayer", "MoEOutput", "MoETransformer", "RoutingStats",
           "count_parameters", "from_pretrained", "generate", "reference_forward", "update_expert_biases", "__version__"]
