import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_hf_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory (config, weights, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    make_hf_tokenizer(64).save_pretrained(path)
    return path


def word_docs(n_docs: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Documents the tiny tokenizer can read: words w3..w63 separated by spaces."""
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, 64)}" for _ in range(rng.randrange(min_words, max_words))) for _ in range(n_docs)]


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir):
    import nanosae

    return nanosae.load_model(str(tiny_llama_dir))


@pytest.fixture(scope="session")
def word_corpus(tmp_path_factory):
    """A .jsonl corpus of 120 word documents."""
    import json

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in word_docs(120)))
    return path
