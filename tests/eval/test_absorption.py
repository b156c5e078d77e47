"""Absorption against a planted SAE whose absorption is known by construction."""

import math

import pytest
import torch

from nanosae import SAE, SAEConfig
from nanosae.errors import DataError
from nanosae.eval.absorption import AbsorptionConfig, absorption, absorption_from_activations

ABSORBED = {0: 0.3, 1: 0.0, 2: 0.5}  # share of each letter's words whose letter a child latent absorbs
WORDS = 60


def planted():
    """Three letters, 60 words each. A word's activation is its letter's direction plus twice its own child
    direction (all orthonormal). The SAE has one latent per letter (decoder: the letter's direction) and one per
    word (decoder: the word's direction; for absorbed words, the word's and the letter's directions together),
    and the letter latent is wired to stay silent on the absorbed words."""
    n_letters = len(ABSORBED)
    n = n_letters * WORDS
    d = n_letters + n
    eye = torch.eye(d, dtype=torch.float64)
    labels = torch.arange(n) // WORDS
    absorbed = torch.tensor([(i % WORDS) < round(ABSORBED[int(labels[i])] * WORDS) for i in range(n)])
    x = eye[labels] + 2 * eye[n_letters + torch.arange(n)] + 0.01 * torch.randn(n, d, dtype=torch.float64)
    sae = SAE(SAEConfig(d_in=d, d_sae=n_letters + n, architecture="relu", dtype="float64"))
    with torch.no_grad():
        sae.b_dec.zero_()
        W_enc, b_enc, W_dec = (
            torch.zeros(d, n_letters + n, dtype=torch.float64),
            torch.zeros(n_letters + n, dtype=torch.float64),
            torch.zeros(n_letters + n, d, dtype=torch.float64),
        )
        for letter in range(n_letters):
            W_enc[:, letter] = eye[letter] - 0.5 * eye[
                n_letters + torch.nonzero((labels == letter) & absorbed)[:, 0]
            ].sum(0)
            b_enc[letter] = -0.5
            W_dec[letter] = eye[letter]
        for i in range(n):
            j = n_letters + i
            W_enc[:, j], b_enc[j] = eye[j], -1.0
            W_dec[j] = (eye[j] + eye[labels[i]]) / math.sqrt(2) if absorbed[i] else eye[j]
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
    return sae, x, labels, absorbed


def test_absorption_rate_is_what_the_construction_implies():
    torch.manual_seed(0)
    sae, x, labels, absorbed = planted()
    cfg = AbsorptionConfig(seed=3)
    result = absorption_from_activations(sae, x, labels, ["a", "b", "c"], cfg)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))  # the same split, by hand
    test = order[: round(len(x) * cfg.test_fraction)]
    for detail in result["details"]:
        letter = "abc".index(detail["first_letter"])
        words = test[labels[test] == letter]
        expected = float(absorbed[words].double().mean())
        assert detail["num_probe_true_positives"] == len(words)  # the letter probe finds every test word
        assert detail["full_absorption_rate"] == pytest.approx(expected)
        assert detail["mean_absorption_fraction"] == pytest.approx(expected)  # absorbed words: all of it
        assert detail["main_latents"] == [letter] and detail["num_split_features"] == 0
    rates = [d["full_absorption_rate"] for d in result["details"]]
    assert result["mean_full_absorption_score"] == pytest.approx(sum(rates) / 3)
    assert 0.2 < result["mean_full_absorption_score"] < 0.35  # (0.3 + 0 + 0.5) / 3 up to the split


def test_an_sae_without_absorbing_latents_scores_zero():
    torch.manual_seed(0)
    sae, x, labels, absorbed = planted()
    with torch.no_grad():  # unwire the absorption: letter latents read their letter alone, children only theirs
        for letter in range(3):
            sae.W_enc[:, letter] = torch.eye(x.shape[1], dtype=torch.float64)[letter]
        sae.W_dec[3:] = torch.eye(x.shape[1], dtype=torch.float64)[3:]
    result = absorption_from_activations(sae, x, labels, ["a", "b", "c"])
    assert result["mean_full_absorption_score"] == 0 and result["mean_absorption_fraction_score"] == 0


def test_a_vocabulary_without_words_is_a_clear_error(tiny_model):
    sae = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=2, hook_name="blocks.1.hook_resid_post"))
    with pytest.raises(DataError, match="single-token words"):
        absorption(sae, tiny_model)
