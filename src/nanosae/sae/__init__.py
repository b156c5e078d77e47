from nanosae.sae.formats import load_sae, save_sae
from nanosae.sae.model import SAE, HookPoint

__all__ = ["SAE", "HookPoint", "load_sae", "save_sae"]
