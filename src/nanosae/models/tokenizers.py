"""Tokenizers behind one small interface: encode(str) -> ids (no BOS), decode(ids) -> str, bos_id.

nanochat's tokenizer.pkl is a pickled tiktoken Encoding. Unpickling runs code named by the file, so we
never unpickle it with plain pickle: the restricted unpickler below only lets the pickle name
tiktoken's Encoding class, and even then captures its state as data and builds the Encoding itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from nanosae.errors import FormatError

NANOCHAT_SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)


class Tokenizer:
    """encode/decode text; bos_id is prepended to each document; eos_id ends generation (may be None)."""

    bos_id: int
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once (back ends override this to tokenize in native threads, without the GIL)."""
        return [self.encode(t) for t in texts]

    def encode_chat(self, user_message: str) -> list[int]:
        """A single-turn chat prompt ending where the assistant's reply begins."""
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    def __init__(self, tok: Any):
        self.tok = tok
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.bos_id = int(bos if bos is not None else 0)
        self.eos_id = tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def encode_chat(self, user_message: str) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            return [self.bos_id] + self.encode(user_message)
        ids = self.tok.apply_chat_template(
            [{"role": "user", "content": user_message}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_tiktoken_pickle(path: str | Path) -> Any:
    """Read nanochat's tokenizer.pkl safely and return a tiktoken Encoding."""
    import tiktoken

    path = Path(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise FormatError(f"{path} not found") from None
    except Exception as e:
        raise FormatError(f"{path}: not a plain tiktoken Encoding pickle ({e})") from None
    state = getattr(obj, "state", None)
    keys = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    if not isinstance(state, dict) or set(state) != keys:
        raise FormatError(f"{path}: unexpected content (expected a tiktoken Encoding with {', '.join(sorted(keys))})")
    ranks, special = state["mergeable_ranks"], state["special_tokens"]
    if not all(isinstance(k, bytes) and isinstance(v, int) for k, v in ranks.items()) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in special.items()
    ):
        raise FormatError(f"{path}: mergeable_ranks/special_tokens have unexpected types")
    return tiktoken.Encoding(
        name=str(state["name"]), pat_str=str(state["pat_str"]), mergeable_ranks=ranks, special_tokens=special
    )


class NanochatTokenizer(Tokenizer):
    def __init__(self, enc: Any):
        self.enc = enc
        self.special = {
            name: enc.encode_single_token(name) for name in NANOCHAT_SPECIAL_TOKENS if name in enc.special_tokens_set
        }
        if "<|bos|>" in self.special:
            self.bos_id = self.special["<|bos|>"]
        elif "<|endoftext|>" in enc.special_tokens_set:  # a tiktoken preset such as gpt2
            self.bos_id = enc.encode_single_token("<|endoftext|>")
        else:
            raise FormatError("nanochat tokenizer has no <|bos|> token")
        self.eos_id = self.special.get("<|assistant_end|>")
        self.vocab_size = enc.n_vocab

    @classmethod
    def from_directory(cls, directory: str | Path) -> NanochatTokenizer:
        return cls(load_tiktoken_pickle(Path(directory) / "tokenizer.pkl"))

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=2)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    def encode_chat(self, user_message: str) -> list[int]:
        s = self.special
        return [
            self.bos_id,
            s["<|user_start|>"],
            *self.encode(user_message),
            s["<|user_end|>"],
            s["<|assistant_start|>"],
        ]
