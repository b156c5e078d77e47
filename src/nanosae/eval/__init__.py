from nanosae.eval.metrics import evaluate

__all__ = ["evaluate"]
