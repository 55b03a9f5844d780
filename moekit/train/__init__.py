from moekit.train.loop import TrainConfig, TrainResult, evaluate, lr_at, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "lr_at", "train"]
