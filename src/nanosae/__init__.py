"""nanosae: sparse autoencoders end to end (collect, train, evaluate, interpret, steer)."""

from nanosae.config import CollectConfig, DataConfig, SAEConfig, TrainConfig
from nanosae.data import ActivationStore, ActivationStream, collect
from nanosae.errors import ConfigError, DataError, FormatError, HookError, NanosaeError, ShapeError, TrainingError
from nanosae.eval import evaluate
from nanosae.models import HostModel, load_model, wrap
from nanosae.sae import SAE
from nanosae.train import TrainResult, train

__all__ = [
    "SAE",
    "SAEConfig",
    "HostModel",
    "load_model",
    "wrap",
    "CollectConfig",
    "DataConfig",
    "ActivationStore",
    "ActivationStream",
    "collect",
    "TrainConfig",
    "TrainResult",
    "train",
    "TrainingError",
    "evaluate",
    "NanosaeError",
    "ConfigError",
    "FormatError",
    "ShapeError",
    "HookError",
    "DataError",
]
