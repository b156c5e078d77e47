import json
import sqlite3

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
    ]
)
def device(request) -> str:
    """A test that takes `device` runs on the CPU and again on CUDA where a GPU is present: kernels, SAE math,
    training steps, splicing and steering, evaluation."""
    return request.param


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
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    make_hf_tokenizer(64).save_pretrained(path)
    return path


def write_corpus(path, docs: list[str]):
    """A .jsonl corpus of these documents at path (returned)."""
    import json

    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def word_docs(n_docs: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Documents the tiny tokenizer can read: words w3..w63 separated by spaces."""
    import random

    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(3, 64)}" for _ in range(rng.randrange(min_words, max_words))) for _ in range(n_docs)
    ]


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir):
    import nanosae

    return nanosae.load_model(str(tiny_llama_dir))


@pytest.fixture()
def tiny_model_on(tiny_llama_dir, tiny_model, device):
    """The tiny model on `device` (the session's CPU one when that is the device)."""
    import nanosae

    return tiny_model if device == "cpu" else nanosae.load_model(str(tiny_llama_dir), device=device)


@pytest.fixture(scope="session")
def word_corpus(tmp_path_factory):
    """A .jsonl corpus of 120 word documents."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", word_docs(120))


# ---- a run directory for viewer / export tests ----

XSS_TOKENS = ["<script>window.__xss = 1</script>", '<img src=x onerror="window.__xss = 2">']


@pytest.fixture(scope="session")
def viewer_run(tiny_model, tiny_llama_dir, word_corpus, tmp_path_factory):
    """A run directory: sae/, features.db (with hostile text planted in it), eval.json."""
    from nanosae import SAE, DataConfig, SAEConfig
    from nanosae.interp.features import FeaturesConfig, build_features

    run = tmp_path_factory.mktemp("viewer_run")
    torch.manual_seed(2)
    sae = SAE(
        SAEConfig(
            d_in=32,
            d_sae=24,
            architecture="topk",
            k=3,
            hook_name="blocks.1.hook_resid_post",
            model_name=str(tiny_llama_dir),
        )
    )
    sae.save(run / "sae")
    cfg = FeaturesConfig(
        data=DataConfig(specs=[str(word_corpus)], context_size=16, split="all"), tokens=500, top_n=4, batch_size=4
    )
    build_features(sae, tiny_model, cfg, run / "features.db")
    con = sqlite3.connect(run / "features.db")
    row = con.execute("SELECT rowid, tokens FROM examples WHERE latent = 3 AND kind = 'top' ORDER BY rank").fetchone()
    tokens = json.loads(row[1])
    tokens[0], tokens[1] = XSS_TOKENS
    tokens[2], tokens[3] = "\n", "<|im_start|>"  # shown as ↵ and as a badge
    con.execute("UPDATE examples SET tokens = ? WHERE rowid = ?", (json.dumps(tokens), row[0]))
    con.execute(
        "UPDATE latents SET explanation = ?, score = 0.9, precision = 0.8, recall = 0.7, method = 'n2g', "
        "score_low = 0.85, score_high = 0.95, n_active = 120, n_silent = 300, n_hard = 40, f1 = 0.75 WHERE id = 3",
        ('<b onmouseover="window.__xss=3">bold</b> words',),
    )
    from nanosae.interp.featuredb import EXPLANATIONS_TABLE

    con.execute(EXPLANATIONS_TABLE)  # latent 3 explained two ways, each kept with its own score
    con.executemany(
        "INSERT INTO explanations (latent, method, explanation, score, score_low, score_high, n_active, n_silent) "
        "VALUES (3, ?, ?, ?, ?, ?, 120, 300)",
        [
            ("n2g", '<b onmouseover="window.__xss=3">bold</b> words', 0.9, 0.85, 0.95),
            ("llm", "words in bold type", 0.7, 0.64, 0.76),
        ],
    )
    con.execute(  # explained, but on too few held-out windows for a score
        "UPDATE latents SET explanation = '\"w9\"', score = NULL, method = 'n2g', score_low = 0.55, score_high = 0.95, "
        "n_active = 6, n_silent = 200, note = 'too little held-out evidence for a score' WHERE id = 4"
    )
    con.execute(
        "UPDATE latents SET note = 'fired 4 times in the text read: too few to explain (needs 20)' WHERE id = 5"
    )
    con.execute("UPDATE latents SET fires = 0, density = 0, max_act = 0, mean_act = 0 WHERE id = 7")  # never fired
    con.execute("DELETE FROM examples WHERE latent = 7")
    con.commit()
    con.close()
    (run / "eval.json").write_text(json.dumps({"fvu": 0.1, "l0": 3.0, "ce_loss_score": 0.95, "feature_density": [0.1]}))
    return run


def assert_replay_matches(model, tokens, layer: int) -> None:
    """Edits at every hook kind of `layer`, run with the clean pass's earlier blocks replayed, give the same
    logits as recomputing them — and the edit is not a no-op."""
    from nanosae.models.host import HOOK_KINDS

    with torch.no_grad():
        for kind in HOOK_KINDS:
            name = f"blocks.{layer}.{kind}"
            n = model.unchanged_blocks([name])
            assert n == (layer + 1 if kind == "hook_resid_post" else layer)
            with model.recording_blocks(n) as outputs:
                clean = model.forward(tokens)
            assert len(outputs) == n
            edit = {name: lambda x: x * 0.5 + 1.0}
            with model.hooks(edit):
                full = model.forward(tokens)
            calls = []
            spies = [model.layers[i].mlp.register_forward_hook(lambda *a: calls.append(1)) for i in range(n)]
            with model.replaying_blocks(outputs), model.hooks(edit):
                replayed = model.forward(tokens)
            for spy in spies:
                spy.remove()
            assert calls == [], f"{name}: replayed blocks still computed their MLP"
            assert torch.allclose(replayed, full, atol=1e-5), name
            assert not torch.allclose(full, clean, atol=1e-3), name
        assert torch.equal(model.forward(tokens), clean)  # the blocks compute again afterwards


@pytest.fixture(scope="session")
def transcoder_set(tiny_model, tiny_llama_dir, word_corpus, tmp_path_factory):
    """A transcoder set for the tiny model (random transcoders), a features.db for layer 1 with one explanation,
    and one traced graph, graphs/tiny.json (every node kept)."""
    from nanosae import SAE, DataConfig, SAEConfig
    from nanosae.interp import circuits as C
    from nanosae.interp.features import FeaturesConfig, build_features
    from nanosae.rundir import TranscoderSetDir

    run = tmp_path_factory.mktemp("transcoder_set")
    torch.manual_seed(4)
    tcs = {}
    for layer in range(tiny_model.n_layers):
        read, write = C.mlp_hooks(layer)
        tc = SAE(
            SAEConfig(
                d_in=32,
                d_sae=24,
                architecture="topk",
                k=3,
                hook_name=read,
                hook_name_out=write,
                d_out=32,
                model_name=str(tiny_llama_dir),
            )
        )
        with torch.no_grad():
            tc.W_dec.mul_(0.3)
        tc.save(run / f"layer_{layer}" / "sae")
        tcs[layer] = tc.eval()
    TranscoderSetDir(run).write_manifest(str(tiny_llama_dir), list(tcs))
    cfg = FeaturesConfig(
        data=DataConfig(specs=[str(word_corpus)], context_size=16, split="all"), tokens=400, top_n=4, batch_size=4
    )
    build_features(tcs[1], tiny_model, cfg, run / "layer_1" / "features.db")
    con = sqlite3.connect(run / "layer_1" / "features.db")
    con.execute("UPDATE latents SET explanation = 'planted explanation'")
    con.commit()
    con.close()
    graph = C.attribute(tiny_model, C.TranscoderSet(tcs), [0, 5, 9, 13, 22, 7])
    graph.transcoders = str(run)
    (run / "graphs").mkdir()
    (run / "graphs" / "tiny.json").write_text(
        json.dumps(C.to_neuronpedia(graph, slug="tiny", node_share=1.0, edge_share=1.0, n_layers=3))
    )
    return run


def mapped_from(tensor, file) -> bool:
    """Whether the tensor's memory lies inside a mapping of `file` in this process (Linux's /proc/self/maps)."""
    from pathlib import Path

    name = str(Path(file).resolve())
    lines = Path("/proc/self/maps").read_text().splitlines()
    spans = [[int(x, 16) for x in line.split()[0].split("-")] for line in lines if line.endswith(name)]
    return any(lo <= tensor.data_ptr() < hi for lo, hi in spans)
