from nanosae.eval.absorption import AbsorptionConfig, absorption  # noqa: E402  (the function shadows its module's name)
from nanosae.eval.metrics import evaluate
from nanosae.eval.probing import ProbingConfig, sparse_probing

__all__ = ["evaluate", "absorption", "AbsorptionConfig", "sparse_probing", "ProbingConfig"]
