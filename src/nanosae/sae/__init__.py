from nanosae.sae.formats import save_sae
from nanosae.sae.model import SAE, HookPoint

load_sae = SAE.load

__all__ = ["SAE", "HookPoint", "load_sae", "save_sae"]
