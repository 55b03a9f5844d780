from moekit.nn.mlp import MLP, activation_fn

__all__ = ["MLP", "activation_fn"]
