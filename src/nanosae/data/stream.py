"""Activations straight from the model, never touching disk, behind the same batches() as a store.

Like SAELens's ActivationsStore: a mixing buffer is filled from fresh forward passes, shuffled, and
half of it is handed out while the other half stays to be mixed with the next refill, so consecutive
batches do not come from the same few documents.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import torch
from torch import Tensor

from nanosae.config import DataConfig
from nanosae.data.corpus import iter_documents
from nanosae.data.tokens import in_background, token_batches
from nanosae.errors import DataError
from nanosae.models import HostModel


class ActivationStream:
    """Several hooks give their activations side by side in columns (one forward pass for all of them); with
    `versus`, a second model's activations at the same hooks on the same windows follow (a streamed diff)."""

    def __init__(
        self,
        model: HostModel,
        hook: str | list[str],
        data: DataConfig,
        model_batch_size: int = 8,
        buffer_tokens: int = 65536,
        versus: HostModel | None = None,
    ):
        self.hooks = [hook] if isinstance(hook, str) else list(hook)
        for h in self.hooks:
            model.parse_hook(h)
        self.model, self.hook, self.data = model, self.hooks[0], data
        self.models = [model] if versus is None else [model, versus]
        self.model_batch_size, self.buffer_tokens = model_batch_size, buffer_tokens
        self.d_in = len(self.models) * sum(model.hook_dim(h) for h in self.hooks)

    def columns(self, hook: str) -> slice:
        """Where one hook's activations sit in the batches."""
        start = sum(self.model.hook_dim(h) for h in self.hooks[: self.hooks.index(hook)])
        return slice(start, start + self.model.hook_dim(hook))

    def activations(self) -> Generator[Tensor, None, None]:
        """Kept activations per forward pass, in corpus order."""
        docs = iter_documents(self.data)
        batches = in_background(
            token_batches(
                docs,
                self.model.tokenizer,
                self.data.context_size,
                self.model_batch_size,
                self.data.pack,
                self.data.exclude_first,
            )
        )
        for batch in batches:
            parts = []
            for model in self.models:
                _, cache = model.run_with_cache(batch.tokens, self.hooks, return_logits=False)
                parts += [cache[h][batch.valid.to(cache[h].device)].float().to(self.model.device) for h in self.hooks]
            acts = torch.cat(parts, dim=-1)
            if not torch.isfinite(acts).all():
                raise DataError(f"NaN or inf activations at {', '.join(self.hooks)}")
            yield acts

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, start_batch: int = 0) -> Iterator[Tensor]:
        """(batch_size, d_in) float32 batches until the corpus ends (a smaller last batch)."""
        gen = torch.Generator().manual_seed(seed)
        # the buffer stays where the model runs: on a GPU, batches go to the SAE without a round trip via the CPU
        buffer = torch.empty(0, self.d_in, device=self.model.device)
        emitted = 0

        def emit(block: Tensor) -> Iterator[Tensor]:
            nonlocal emitted
            for i in range(0, len(block), batch_size):
                if emitted >= start_batch:
                    yield block[i : i + batch_size]
                emitted += 1

        pending, pending_n = [], 0
        for acts in self.activations():
            pending.append(acts)
            pending_n += len(acts)
            if len(buffer) + pending_n < self.buffer_tokens:
                continue
            buffer = torch.cat([buffer, *pending])  # one copy per refill, not one per forward pass
            pending, pending_n = [], 0
            if shuffle:
                buffer = buffer[torch.randperm(len(buffer), generator=gen).to(buffer.device)]
            n_out = (len(buffer) // 2) // batch_size * batch_size
            yield from emit(buffer[:n_out])
            buffer = buffer[n_out:]
        buffer = torch.cat([buffer, *pending])
        if shuffle and len(buffer):
            buffer = buffer[torch.randperm(len(buffer), generator=gen).to(buffer.device)]
        yield from emit(buffer)
