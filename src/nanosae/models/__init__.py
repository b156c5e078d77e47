"""Host models: load_model(spec) for Hugging Face / GGUF / nanochat, wrap(module) for a live nanochat GPT."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch
from torch import nn

from nanosae.models.host import HOOK_KINDS, Generation, HostModel, LayerModules
from nanosae.models.tokenizers import Tokenizer

__all__ = ["HOOK_KINDS", "Generation", "HostModel", "LayerModules", "Tokenizer", "load_model", "wrap"]


def load_model(
    spec: str, device: str = "cpu", dtype: torch.dtype | None = None, tokenizer: str | Path | None = None
) -> HostModel:
    """ "smollm2-135m" (embedded), a HF directory / hub name / .gguf file, or "nanochat:DIR[@STEP]".

    A plain directory holding model_*.pt + meta_*.json is read as a nanochat checkpoint too.
    tokenizer: a nanochat tokenizer directory, when it is not found next to the checkpoints.
    """
    from nanosae.config import check_device
    from nanosae.models.hf import load_hf
    from nanosae.models.nanochat import load_nanochat

    check_device(device)
    if spec.startswith("nanochat:"):
        return load_nanochat(spec.removeprefix("nanochat:"), device, dtype, tokenizer)
    path = Path(spec.partition("@")[0])
    if path.is_dir() and any(path.glob("model_*.pt")):
        return load_nanochat(spec, device, dtype, tokenizer)
    return load_hf(spec, device, dtype)


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MB for reuse instead of returning them to the OS.

    A CPU forward pass allocates and frees ~10 MB activations in every layer; by default glibc hands such
    blocks back (mmap / heap trimming), so each new one costs a page fault per 4 KB page (docs/benchmarks.md
    measures the gain). The process then holds its peak memory. It changes the whole process, so nanosae's
    library never calls it on its own: the `nanosae` command and the demo do, and so can your script.
    Linux/glibc only; NANOSAE_MALLOC_TUNING=0 leaves the allocator alone. Returns whether it was set.
    """
    if not sys.platform.startswith("linux") or os.environ.get("NANOSAE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 128 << 20))


def wrap(module: nn.Module, tokenizer: Tokenizer | None = None, name: str = "wrapped") -> HostModel:
    """Hook a live nanochat GPT (or any module with transformer.h[i].attn/.mlp/.mlp.c_proj) directly.

    Generation with a wrapped module recomputes the prefix at each step (nanochat's own KV cache
    lives in its Engine, outside the module).
    """
    from nanosae.models.nanochat import NanochatModel

    return NanochatModel(module, tokenizer, name)
