"""Tokenize and pack documents into fixed windows, as SAELens does.

Packed (default): documents are joined with the BOS token between them and cut into windows that each
start with BOS, so every document is preceded by BOS and no window starts without context.
Unpacked (--no-pack): one window per document, truncated to context_size and right-padded.
Positions holding BOS, padding, or among the first `exclude_first` of a window are not collected.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

from nanosae.errors import DataError
from nanosae.models.tokenizers import Tokenizer

T = TypeVar("T")


class TokenBatch(NamedTuple):
    tokens: Tensor  # (B, T) long
    valid: Tensor  # (B, T) bool: positions whose activations are kept


def windows(
    docs: Iterable[str], tokenizer: Tokenizer, context_size: int, pack: bool = True
) -> Iterator[tuple[list[int], int]]:
    """(tokens of length context_size, number of real tokens) per window."""
    if context_size < 2:
        raise DataError(f"context_size must be at least 2, got {context_size}")
    bos, body = tokenizer.bos_id, context_size - 1
    if not pack:
        for doc_ids in _encoded(docs, tokenizer):
            ids = [bos, *doc_ids[:body]]
            yield ids + [bos] * (context_size - len(ids)), len(ids)
        return
    stream: list[int] = []
    start = 0
    for n_docs, doc_ids in enumerate(_encoded(docs, tokenizer)):
        if n_docs:
            stream.append(bos)
        stream.extend(doc_ids)
        while len(stream) - start >= body:
            yield [bos, *stream[start : start + body]], context_size
            start += body
        if start > len(stream) // 2:  # compact now and then instead of slicing per window
            del stream[:start]
            start = 0


def _encoded(docs: Iterable[str], tokenizer: Tokenizer, group: int = 16) -> Iterator[list[int]]:
    """Token ids per document, tokenized a group at a time (native tokenizers release the GIL for a batch)."""
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == group:
            yield from tokenizer.encode_batch(batch)
            batch = []
    if batch:
        yield from tokenizer.encode_batch(batch)


def valid_mask(tokens: Tensor, n_real: Tensor, bos: int, exclude_first: int) -> Tensor:
    positions = torch.arange(tokens.shape[1])[None, :]
    return (tokens != bos) & (positions >= exclude_first) & (positions < n_real[:, None])


def token_batches(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    context_size: int,
    batch_size: int,
    pack: bool = True,
    exclude_first: int = 0,
) -> Generator[TokenBatch, None, None]:
    """Batches of windows; the last incomplete batch is yielded too."""
    rows: list[list[int]] = []
    lengths: list[int] = []

    def emit() -> TokenBatch:
        tokens = torch.tensor(rows, dtype=torch.long)
        return TokenBatch(tokens, valid_mask(tokens, torch.tensor(lengths), tokenizer.bos_id, exclude_first))

    for ids, n in windows(docs, tokenizer, context_size, pack):
        rows.append(ids)
        lengths.append(n)
        if len(rows) == batch_size:
            yield emit()
            rows, lengths = [], []
    if rows:
        yield emit()


def in_background(items: Iterator[T], depth: int = 4) -> Generator[T, None, None]:
    """Run an iterator in a worker thread, `depth` items ahead, so the consumer never waits on it.

    Exceptions in the worker are re-raised in the consumer. Closing the consumer (or dropping it) stops the
    worker and waits for it: a thread still inside native code (a tokenizer, torch) when the interpreter
    exits can abort the process ("terminate called without an active exception").
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer
            put((done, e))

    thread = threading.Thread(target=work, daemon=True, name="nanosae-prefetch")
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
