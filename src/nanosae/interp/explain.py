"""N2G-style explanations: short token patterns that predict where a latent fires, scored on held-out examples.

For each latent, its examples (token windows with the latent's activation on every token) are split:
even-ranked ones to build patterns, odd-ranked ones to score them. A pattern is a token sequence ending at
the activating token, with optional wildcards ("*"): (t0), (t-1, t0), (t-2, *, t0), (t-2, t-1, t0).
Patterns are chosen greedily, up to three, each one kept only if it raises the F1 of predicting "strongly
active" positions (activation ≥ 25% of the latent's maximum) on the building half. The score is the F1 of
the chosen patterns on the held-out half. Explanations and scores go into features.db in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from nanosae.interp.featuredb import FeatureDB
from nanosae.interp.featuredb import db_path as db_path_of
from nanosae.io import write_lock

WILDCARD = None
ACTIVE_FRACTION = 0.25
Pattern = tuple  # tokens from oldest to the activating one; None = any token


class Example(NamedTuple):
    tokens: list[str]
    acts: list[float]


def matches(pattern: Pattern, tokens: list[str], pos: int) -> bool:
    start = pos - len(pattern) + 1
    if start < 0:
        return False
    return all(p is WILDCARD or p == tokens[start + i] for i, p in enumerate(pattern))


def candidates(tokens: list[str], pos: int) -> list[Pattern]:
    t = tokens
    out: list[Pattern] = [(t[pos],)]
    if pos >= 1 and t[pos - 1]:
        out.append((t[pos - 1], t[pos]))
    if pos >= 2 and t[pos - 2]:
        out += [(t[pos - 2], WILDCARD, t[pos]), (t[pos - 2], t[pos - 1], t[pos])]
    return out


def f1(patterns: list[Pattern], examples: list[Example], threshold: float) -> tuple[float, float, float]:
    """(precision, recall, F1) of 'some pattern matches here' against 'activation ≥ threshold here'."""
    index, active = _index(examples, threshold)
    return _score(set().union(*(index.get(p, set()) for p in patterns)) if patterns else set(), active)


def _index(examples: list[Example], threshold: float) -> tuple[dict[Pattern, set], set]:
    """Every candidate pattern -> the positions (example, pos) it matches; and the strongly active positions."""
    index: dict[Pattern, set] = {}
    active = set()
    for e, ex in enumerate(examples):
        for pos, tok in enumerate(ex.tokens):
            if not tok:
                continue
            for c in candidates(ex.tokens, pos):
                index.setdefault(c, set()).add((e, pos))
            if ex.acts[pos] >= threshold:
                active.add((e, pos))
    return index, active


def _score(predicted: set, active: set) -> tuple[float, float, float]:
    tp = len(predicted & active)
    precision = tp / len(predicted) if predicted else 0.0
    recall = tp / len(active) if active else 0.0
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


MIN_HELD_OUT_ACTIVE = 3  # fewer strongly active held-out positions than this: no evidence, score 0


def explain_latent(examples: list[Example], max_act: float, max_patterns: int = 3) -> tuple[list[Pattern], float]:
    """Patterns built on the even-ranked examples and their held-out F1 on the odd-ranked ones."""
    threshold = ACTIVE_FRACTION * max_act
    build, held_out = examples[0::2], examples[1::2]
    if not build or max_act <= 0:
        return [], 0.0
    index, active = _index(build, threshold)
    pool = {c for (e, pos) in active for c in candidates(build[e].tokens, pos) if len(index[c] & active) >= 2}
    chosen: list[Pattern] = []
    covered: set = set()
    best = 0.0
    for _ in range(max_patterns):
        scored = [(_score(covered | index[c], active)[2] - 0.01 * len(c), c) for c in pool if c not in chosen]
        if not scored:
            break
        score, c = max(scored, key=lambda s: (s[0], -len(s[1]), str(s[1])))
        if score <= best + 0.01:
            break
        chosen.append(c)
        covered |= index[c]
        best = score
    h_index, h_active = _index(held_out, threshold)
    if len(h_active) < MIN_HELD_OUT_ACTIVE:
        return chosen, 0.0
    predicted = set().union(*(h_index.get(p, set()) for p in chosen)) if chosen else set()
    return chosen, _score(predicted, h_active)[2]


def describe(patterns: list[Pattern]) -> str:
    """Human-readable: each pattern as quoted tokens, '*' for a wildcard, alternatives joined by ' | '."""
    return " | ".join(" ".join("*" if t is WILDCARD else json.dumps(t, ensure_ascii=False) for t in p) for p in patterns)


def write_explanations(db_path: str | Path, explain_one: Callable[[list[Example], float], tuple[str | None, float]],
                       method: str, most_frequent_first: bool = False, limit: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> int:
    """Explain every feature that fired (or the `limit` most frequent) and write all rows in one transaction."""
    with write_lock(db_path_of(db_path), directory=False):
        db = FeatureDB(db_path, readonly=False)
        try:
            latents = db.to_explain(most_frequent_first, limit)
            updates = []
            for n, row in enumerate(latents):
                examples = [Example(json.loads(r["tokens"]), json.loads(r["acts"])) for r in db.examples(row["id"])]
                text, score = explain_one(examples, row["max_act"])
                updates.append((text, round(score, 4), method, row["id"]))
                if progress is not None:
                    progress(n + 1, len(latents))
            db.set_explanations(updates)
        finally:
            db.close()
    return len(updates)


def explain_n2g(db_path: str | Path, progress: Callable[[int, int], None] | None = None) -> int:
    """Write an N2G explanation and score for every latent that fired into features.db; returns how many."""
    def one(examples: list[Example], max_act: float) -> tuple[str | None, float]:
        patterns, score = explain_latent(examples, max_act)
        return (describe(patterns) if patterns else None), score

    return write_explanations(db_path, one, "n2g", progress=progress)
