"""Do stored explanation scores hold on text nobody used? A sceptic's recomputation on held-out documents.

For a run with an explained features.db (N2G), reads held-out text (the eval split: every 20th document,
which collection, training and the feature pass never read), cuts it into 17-token windows (12 before and
4 after a token, rows tiled from a random offset), and recomputes every explained latent's detection score
with the protocol written out here (not the library's code): balanced accuracy of "the pattern occurs in the
window" against "the latent reaches 25% of its max there", the silent half split evenly between random
silent windows and hard negatives (windows with one of the latent's five most frequent activating tokens).
Prints the stored and recomputed scores' medians, how many latents claim ≥ 0.9 in each, and (databases that
store intervals) the share of recomputed scores inside the stored 95% intervals.
Usage: python benchmarks/explanation_scores.py RUN [--tokens 60000]
"""

import argparse
import json
import random
import statistics

import torch
from _results import save

from nanosae.config import DataConfig
from nanosae.data import iter_documents, token_batches
from nanosae.interp.featuredb import FeatureDB
from nanosae.rundir import load_sae_and_model

LEFT, RIGHT = 12, 4
WIDTH = LEFT + 1 + RIGHT


def fold(t: str) -> str:
    return t.lstrip(" ▁Ġ").lower()


def patterns_of(explanation: str) -> list[list]:
    """An N2G explanation read back: ' | ' between patterns, '*' a wildcard, ~"x" folded, "x" exact."""
    out = []
    for part in explanation.split(" | "):
        words, rest = [], part
        while rest:
            rest = rest.lstrip(" ")
            if rest.startswith("*"):
                words.append(None)
                rest = rest[1:]
                continue
            folded = rest.startswith("~")
            text, end = json.JSONDecoder().raw_decode(rest[1:] if folded else rest)
            words.append(("fold" if folded else "exact", text))
            rest = (rest[1:] if folded else rest)[end:]
        out.append(words)
    return out


def matches(patterns: list[list], tokens: list[str]) -> bool:
    def same(want, tok: str) -> bool:
        return want is None or (tok == want[1] if want[0] == "exact" else fold(tok) == fold(want[1]))

    return any(
        all(same(w, tokens[end - len(p) + 1 + i]) for i, w in enumerate(p))
        for p in patterns
        for end in range(len(p) - 1, len(tokens))
    )


def held_out_windows(sae, model, hook: str, data: DataConfig, tokens: int) -> tuple[list[list[str]], torch.Tensor]:
    """(tokens of each window, each window's per-latent maximum activation (n, d_sae))."""
    rng, texts, maxima, seen = random.Random(0), [], [], 0
    for batch in token_batches(iter_documents(data), model.tokenizer, data.context_size, 8):
        _, cache = model.run_with_cache(batch.tokens.to(model.device), [hook], return_logits=False)
        z = (sae.encode(cache[hook].float()) * batch.valid[..., None]).detach()
        T = batch.tokens.shape[1]
        per_row = max(1, T // WIDTH)
        for row, valid, acts in zip(batch.tokens.tolist(), batch.valid.tolist(), z):
            start = rng.randrange(0, T - per_row * WIDTH + 1)
            for lo in range(start, start + per_row * WIDTH, WIDTH):
                if valid[lo + LEFT]:
                    texts.append([model.tokenizer.decode([i]) for i in row[lo : lo + WIDTH]])
                    maxima.append(acts[lo : lo + WIDTH].amax(0))
        seen += int(batch.valid.sum())
        if seen >= tokens:
            break
    return texts, torch.stack(maxima)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--tokens", type=int, default=60_000)
    p.add_argument("--data", action="append", default=None)
    args = p.parse_args()
    _, sae, model = load_sae_and_model(args.run)
    db = FeatureDB(args.run)
    meta = db.meta()
    specs = meta["data"] if isinstance(meta.get("data"), list) else DataConfig().specs  # the feature pass's text
    data = DataConfig(specs=args.data or specs, context_size=int(meta.get("context_size") or 256), split="eval")
    texts, maxima = held_out_windows(sae, model, sae.cfg.hook_name, data, args.tokens)
    columns = {r["name"] for r in db.rows("PRAGMA table_info(latents)")}
    interval = "score_low" in columns
    rows = db.rows(
        "SELECT id, max_act, explanation, score"
        + (", score_low, score_high" if interval else "")
        + " FROM latents WHERE explanation IS NOT NULL AND score IS NOT NULL AND method = 'n2g'"
    )
    stored, again, inside = [], [], 0
    for r in rows:
        threshold = 0.25 * r["max_act"]
        counts: dict[str, int] = {}
        for e in db.examples(r["id"]):
            for tok, act in zip(db.cell(e["tokens"], "tokens"), db.cell(e["acts"], "acts")):
                if tok and act >= threshold:
                    counts[fold(tok)] = counts.get(fold(tok), 0) + 1
        hard = set(sorted(counts, key=lambda t: (-counts[t], t))[:5])
        pats = patterns_of(r["explanation"])
        active = maxima[:, r["id"]] >= threshold
        said = {"active": [], "hard": [], "random": []}
        for w, tokens in enumerate(texts):
            kind = "active" if active[w] else "hard" if any(fold(t) in hard for t in tokens if t) else "random"
            said[kind].append(matches(pats, tokens))
        silent = [1 - sum(v) / len(v) for k, v in said.items() if k != "active" and v]
        if not said["active"] or not silent:
            continue
        score = (sum(said["active"]) / len(said["active"]) + sum(silent) / len(silent)) / 2
        stored.append(r["score"])
        again.append(score)
        inside += interval and r["score_low"] <= score <= r["score_high"]
    n = len(stored)
    figures = {
        "held_out_windows": len(texts),
        "latents_compared": n,
        "median_stored": round(statistics.median(stored), 3),
        "median_recomputed": round(statistics.median(again), 3),
        "stored_at_least_0.9": sum(s >= 0.9 for s in stored),
        "recomputed_at_least_0.9": sum(s >= 0.9 for s in again),
        "median_abs_difference": round(statistics.median(abs(a - b) for a, b in zip(stored, again)), 3),
        "inside_stored_interval": round(inside / n, 3) if interval else None,
    }
    for k, v in figures.items():
        print(f"{k:28} {v}")
    save(__file__, figures)


if __name__ == "__main__":
    main()
