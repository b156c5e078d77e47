"""nanosae: sparse autoencoders end to end (collect, train, evaluate, interpret, steer)."""

from nanosae.config import CollectConfig, DataConfig, SAEConfig
from nanosae.data import ActivationStore, ActivationStream, collect
from nanosae.errors import ConfigError, DataError, FormatError, HookError, NanosaeError, ShapeError
from nanosae.models import HostModel, load_model, wrap
from nanosae.sae import SAE

__all__ = [
    "SAE", "SAEConfig", "HostModel", "load_model", "wrap",
    "CollectConfig", "DataConfig", "ActivationStore", "ActivationStream", "collect",
    "NanosaeError", "ConfigError", "FormatError", "ShapeError", "HookError", "DataError",
]
