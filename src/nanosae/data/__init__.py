from nanosae.data.collect import CollectProgress, collect
from nanosae.data.corpus import iter_documents
from nanosae.data.store import ActivationStore, write_store
from nanosae.data.stream import ActivationStream
from nanosae.data.tokens import TokenBatch, token_batches

__all__ = [
    "ActivationStore",
    "ActivationStream",
    "CollectProgress",
    "TokenBatch",
    "collect",
    "iter_documents",
    "token_batches",
    "write_store",
]
