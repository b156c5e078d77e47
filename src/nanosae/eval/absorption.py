"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"; SAEBench's rules).

A word token's first letter is linearly decodable from the residual stream. An SAE "absorbs" that feature
when, for some words, the latents that usually carry "starts with L" stay silent and a more specific latent
(say, "the word 'lion'") fires instead with the letter direction folded into its decoder row. Steps:

1. words: single tokens of the host model's vocabulary that are a space and letters (" apple"), each with
   its first letter; lines "{word} has the first letter: A", many per prompt after a few example lines; the
   activation is read at each word's own token, at the SAE's hook; words split into train and test.
2. a logistic probe per letter (one-vs-rest) on those activations: the letter's ground-truth direction.
3. each letter's main latents by k-sparse probing: latents ranked by how much more they fire on the letter's
   words; k grows from 1 while the test F1 of a probe on the top k jumps by more than f1_jump; the extra
   latents kept are the letter's "split" features.
4. on the test words of the letter that the probe gets right, each latent's contribution along the probe
   direction (its activation × its decoder row · the unit probe, in the input's units):
   - full absorption: the main latents are all silent, the latent with the largest contribution has
     cosine ≥ full_cos with the probe, and it supplies ≥ proportion of the activation's projection x · p̂;
   - absorption fraction: the share of x · p̂ that other aligned latents (cosine ≥ fraction_cos, at most
     max_absorbers) supply in place of the main latents (0 when the main latents account for it).
Scores are means over the probe's true positives per letter, then over the letters.
"""

from __future__ import annotations

import random
import re
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from nanosae.config import check_range
from nanosae.errors import ConfigError, DataError
from nanosae.eval.probes import f1, fit_logistic, top_latents
from nanosae.eval.probing import window_activations
from nanosae.models import HostModel
from nanosae.sae import SAE

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-8


@dataclass
class AbsorptionConfig:
    template: str = "{word} has the first letter:"
    icl_examples: int = 4
    """Answered lines before the first word read in each prompt."""
    words_per_prompt: int = 32
    max_words: int = 3000
    test_fraction: float = 0.3
    max_k: int = 10
    f1_jump: float = 0.03
    full_cos: float = 0.025
    fraction_cos: float = 0.1
    proportion: float = 0.4
    max_absorbers: int = 3
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if "{word}" not in self.template:
            raise ConfigError(f"absorption template {self.template!r} must contain {{word}}")
        check_range("test_fraction", self.test_fraction, 0, 1, open_low=True, open_high=True)
        for name in ("max_words", "max_k", "max_absorbers", "batch_size", "words_per_prompt"):
            check_range(name, getattr(self, name), 1)


def letter_words(model: HostModel, max_words: int, seed: int = 0) -> list[str]:
    """Up to max_words vocabulary tokens that are a space and two or more ASCII letters and that the tokenizer
    reads back as that one token (so the prompt holds the word as a single token)."""
    tok = model.tokenizer
    found = [(i, text) for i in range(tok.vocab_size) if re.fullmatch(r" [A-Za-z]{2,}", text := tok.decode([i]))]
    random.Random(seed).shuffle(found)
    words = [text for i, text in found[: max_words * 2] if tok.encode(text) == [i]]
    if len(words) < 2 * len(LETTERS):
        raise DataError(f"the tokenizer has only {len(words)} single-token words; the absorption task needs more")
    return words[:max_words]


def prompts(model: HostModel, words: list[str], cfg: AbsorptionConfig) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token sequences of answered lines ("{word} has the first letter: A") and, in each, (word index,
    position of its token) of the words read. Many words share a sequence: every line is an in-context example
    for the lines after it, and a word's activation cannot see its own answer (it comes later), so one pass
    reads many words; the first icl_examples lines of each sequence only serve as examples. A word whose token
    merges with the text around it is left out."""
    tok, rng = model.tokenizer, random.Random(cfg.seed)
    line = lambda w: f"{cfg.template.format(word=w)} {w.strip()[0].upper()}\n"
    out = []
    for start in range(0, len(words), cfg.words_per_prompt):
        chunk = list(range(start, min(start + cfg.words_per_prompt, len(words))))
        examples = rng.sample(
            [w for i, w in enumerate(words) if not start <= i < chunk[-1] + 1] or words,
            min(cfg.icl_examples, len(words)),
        )
        text, heads = "".join(map(line, examples)), []
        for i in chunk:
            heads.append((i, tok.encode(text + words[i])))
            text += line(words[i])
        tokens = [tok.bos_id] + tok.encode(text)
        out.append((tokens, [(i, len(head)) for i, head in heads if tokens[1 : len(head) + 1] == head]))
    return out


def word_activations(model: HostModel, hook: str, words: list[str], cfg: AbsorptionConfig) -> tuple[Tensor, list[int]]:
    """(activations at the hook read at each word's token, the indices of the words read)."""
    rows = prompts(model, words, cfg)
    acts = window_activations(model, hook, [tokens for tokens, _ in rows], cfg.batch_size)
    x = torch.cat([a[[p for _, p in places]] for a, (_, places) in zip(acts, rows)])
    return x, [w for _, places in rows for w, _ in places]


def absorption(
    sae: SAE, model: HostModel, cfg: AbsorptionConfig | None = None, hook: str | None = None
) -> dict[str, Any]:
    """The first-letter absorption of an SAE on this host model (a dict: means, per-letter details, config)."""
    cfg = cfg or AbsorptionConfig()
    if sae.cfg.kind != "sae":
        raise ConfigError(f"absorption is for SAEs at one hook, not a {sae.cfg.kind}")
    hook = hook or sae.cfg.hook_name
    x, labels = letter_data(model, hook, cfg)
    return absorption_from_activations(sae, x, labels, list(LETTERS), cfg) | {"hook": hook}


def letter_data(model: HostModel, hook: str, cfg: AbsorptionConfig) -> tuple[Tensor, Tensor]:
    """(activations at each word's token, first-letter ids): what every SAE at that hook is scored on."""
    words = letter_words(model, cfg.max_words, cfg.seed)
    x, read = word_activations(model, hook, words, cfg)
    return x, torch.tensor([LETTERS.index(words[i].strip()[0].lower()) for i in read])


def _contribution_scale(sae: SAE, x: Tensor) -> Tensor:
    """(n,) factor taking a decoder row times an activation to the input's units, per token."""
    _, state = sae.normalize_input(x)
    unit = torch.zeros(len(x), sae.cfg.d_out, dtype=sae.dtype)
    unit[:, 0] = 1.0
    return (sae.denormalize(unit, state) - sae.denormalize(torch.zeros_like(unit), state))[:, 0]


@torch.no_grad()
def absorption_from_activations(
    sae: SAE, x: Tensor, labels: Tensor, classes: list[str], cfg: AbsorptionConfig | None = None
) -> dict[str, Any]:
    """Absorption given activations x (n, d_in) and class ids (n,); classes names them (letters)."""
    cfg = cfg or AbsorptionConfig()
    x = x.float()
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_test = max(1, round(n * cfg.test_fraction))
    test, train = order[:n_test], order[n_test:]
    onehot = torch.nn.functional.one_hot(labels, len(classes)).float()
    present = [c for c in range(len(classes)) if onehot[train, c].sum() > 0 and onehot[test, c].sum() > 0]
    probe = fit_logistic(x[train], onehot[train][:, present])
    z = sae.encode(x.to(sae.dtype)).float()
    scale = _contribution_scale(sae, x.to(sae.dtype)).float()
    W_dec = sae.W_dec.float()
    details: list[dict[str, Any]] = []
    for j, c in enumerate(present):
        y = onehot[:, c].bool()
        direction = probe.weight[:, j] / probe.weight[:, j].norm().clamp_min(1e-12)
        ranked = top_latents(z[train], y[train], cfg.max_k, signed=True)
        main, best = [], -1.0
        for k in range(1, len(ranked) + 1):  # grow k while the F1 jumps: the letter's main (and split) latents
            ids = ranked[:k]
            p = fit_logistic(z[train][:, ids], y[train])
            score = f1(p.scores(z[test][:, ids]) > 0, y[test])
            if score <= best + cfg.f1_jump:
                break
            main, best = ids.tolist(), score
        cos = (W_dec @ direction) / W_dec.norm(dim=1).clamp_min(1e-12)
        positives = test[y[test] & (probe.scores(x[test])[:, j] > 0)]
        fractions, full = [], []
        for i in positives.tolist():
            fraction, is_full = _absorbed(x[i] @ direction, z[i] * (W_dec @ direction) * scale[i], z[i], cos, main, cfg)
            fractions.append(fraction)
            full.append(is_full)
        details.append(
            {
                "first_letter": classes[c],
                "mean_absorption_fraction": _mean(fractions),
                "full_absorption_rate": _mean(full),
                "num_full_absorption": sum(full),
                "num_probe_true_positives": len(positives),
                "num_split_features": max(0, len(main) - 1),
                "main_latents": main,
                "k_sparse_f1": best,
            }
        )
    scored = [d for d in details if d["num_probe_true_positives"] > 0]
    if not scored:
        raise DataError("the letter probes found no test word of any letter; absorption cannot be measured")
    col = lambda key: [d[key] for d in scored]
    return {
        "mean_absorption_fraction_score": statistics.fmean(col("mean_absorption_fraction")),
        "mean_full_absorption_score": statistics.fmean(col("full_absorption_rate")),
        "mean_num_split_features": statistics.fmean(col("num_split_features")),
        "std_dev_absorption_fraction_score": _std(col("mean_absorption_fraction")),
        "std_dev_full_absorption_score": _std(col("full_absorption_rate")),
        "std_dev_num_split_features": _std(col("num_split_features")),
        "letters_scored": len(scored),
        "words": n,
        "details": details,
        "config": asdict(cfg),
    }


def _absorbed(
    act_proj: Tensor, contributions: Tensor, acts: Tensor, cos: Tensor, main: list[int], cfg: AbsorptionConfig
) -> tuple[float, bool]:
    """(absorption fraction, full absorption) of one word (SAEBench's rules)."""
    projection = float(act_proj)
    main_mask = torch.zeros_like(cos, dtype=torch.bool)
    main_mask[main] = True
    main_proj = float(contributions[main_mask].sum())
    others = contributions[~main_mask & (cos >= cfg.fraction_cos) & (contributions > 0)]
    absorbers = float(others.topk(min(cfg.max_absorbers, len(others))).values.sum()) if len(others) else 0.0
    if main_proj >= projection or projection <= 0 or absorbers / projection < cfg.proportion:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, projection - main_proj)
        fraction = min(1.0, max(0.0, absorbed / (absorbed + main_proj)))
    top = int(contributions.argmax())
    silent = bool((acts[main] < EPS).all())
    full = (
        silent
        and float(cos[top]) >= cfg.full_cos
        and projection > 0
        and float(contributions[top]) / projection >= cfg.proportion
    )
    return fraction, bool(full)


def _mean(values: list) -> float:
    return statistics.fmean(values) if values else 0.0


def _std(values: list) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0
