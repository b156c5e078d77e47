"""nanosae: sparse autoencoders end to end (collect, train, evaluate, interpret, steer)."""

from nanosae.config import SAEConfig
from nanosae.errors import ConfigError, DataError, FormatError, HookError, NanosaeError, ShapeError
from nanosae.models import HostModel, load_model, wrap
from nanosae.sae import SAE

__all__ = [
    "SAE", "SAEConfig", "HostModel", "load_model", "wrap",
    "NanosaeError", "ConfigError", "FormatError", "ShapeError", "HookError", "DataError",
]
