"""Sparse probing: labels from text checked by hand, probes against planted features, the user-task path."""

import json
import random

import pytest
import torch

from nanosae import SAE, SAEConfig
from nanosae.errors import DataError
from nanosae.eval.probing import ProbingConfig, code_labels, probe_task, prose_labels, sparse_probing


def marked(text: str, labels: list[bool]) -> str:
    return "".join(c for c, v in zip(text, labels) if v)


def test_code_labels_by_hand():
    text = 'x = f(a, "s#t")  # note\nif y:\n    pass\n'
    labels = code_labels(text)
    assert marked(text, labels["string"]) == '"s#t"'
    assert marked(text, labels["comment"]) == "# note"  # the # inside the string is not a comment
    assert marked(text, labels["keyword"]) == "ifpass"
    assert marked(text, labels["brackets"]) == 'a, "s#t"'  # strictly between the brackets
    assert code_labels("def f(:\n") is None or isinstance(code_labels("def f(:\n"), dict)
    assert code_labels('"""never closed\n') is None


def test_prose_labels_by_hand():
    text = "Hello world. The 2nd one is here.\n\nnew paragraph, Python 3."
    labels = prose_labels(text)
    assert marked(text, labels["sentence"]) == "HTn"
    assert marked(text, labels["digit"]) == "23"
    assert marked(text, labels["capitalised"]) == "HTP"


def test_one_latent_that_reads_the_concept_makes_a_perfect_one_sparse_probe():
    torch.manual_seed(0)
    n, d = 400, 16
    y = torch.arange(n) % 2
    x = torch.randn(n, d)
    x[:, 3] += 5 * y  # the concept lives on dimension 3
    sae = SAE(SAEConfig(d_in=d, d_sae=8, architecture="relu"))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_enc[:, 0] = 0
        sae.W_enc[3] = 0  # only latent 0 reads dimension 3
        sae.W_enc[3, 0] = 1.0  # latent 0 reads dimension 3
        sae.b_enc.zero_()
        sae.b_enc[0] = -2.5
        sae.b_dec.zero_()
    result = probe_task(sae, x, y, ProbingConfig(per_class=200), random.Random(0))
    assert result["llm_test_accuracy"] > 0.9 and result["llm_top_1_test_accuracy"] > 0.9
    assert result["sae_top_1_test_accuracy"] > 0.9
    with torch.no_grad():
        sae.W_enc[3, 0] = 0.0  # now no latent reads it
    blind = probe_task(sae, x, y, ProbingConfig(per_class=200), random.Random(0))
    assert blind["sae_top_1_test_accuracy"] < 0.75


def test_user_tasks_per_token_and_per_document(tiny_model, tmp_path):
    rng = random.Random(0)
    token_task, doc_task = tmp_path / "has_w7.jsonl", tmp_path / "starts_w5.jsonl"
    with open(token_task, "w") as f, open(doc_task, "w") as g:
        for _ in range(120):
            words = [f"w{rng.randrange(3, 12)}" for _ in range(rng.randrange(6, 20))]
            f.write(json.dumps({"text": " ".join(words), "labels": [int(w == "w7") for w in words]}) + "\n")
            g.write(json.dumps({"text": " ".join(words), "labels": int(words.count("w5") >= 2)}) + "\n")
    sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=8, hook_name="blocks.0.hook_resid_post"))
    cfg = ProbingConfig(code=[], prose=[], user_tasks=[str(token_task), str(doc_task)], per_class=150)
    result = sparse_probing(sae, tiny_model, cfg)
    assert result["tasks"] == 2 and set(result["details"]) == {"has_w7", "starts_w5"}
    assert result["details"]["has_w7"]["llm_test_accuracy"] > 0.95  # token identity is linear in the residual stream
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "w3 w4", "labels": [1]}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        sparse_probing(sae, tiny_model, ProbingConfig(code=[], prose=[], user_tasks=[str(bad)]))
