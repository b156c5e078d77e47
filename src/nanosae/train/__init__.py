from nanosae.train.trainer import TrainProgress, TrainResult, train

__all__ = ["TrainProgress", "TrainResult", "train"]
