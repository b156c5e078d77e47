from nanosae.train.trainer import Progress, TrainResult, train

__all__ = ["Progress", "TrainResult", "train"]
