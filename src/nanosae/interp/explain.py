"""Explanations and how honestly they are scored.

Evidence for a latent: its top and quantile examples (token windows with the latent's activation on every
token) and the random windows of the text stored in features.db (where it mostly does not fire). A token is
"active" when the latent reaches 25% of its maximum there. Both kinds of window are split: even-ranked ones
build the explanation, odd-ranked ones score it.

N2G patterns: a token sequence ending at the activating token, with optional wildcards ("*"): (t0),
(t-1, t0), (t-2, *, t0), (t-2, t-1, t0). Up to three are chosen greedily, each kept only if it raises the
token-level F1 of predicting active tokens on the building windows, non-activating ones included, so a
pattern that also matches where the latent is silent is not chosen.

Detection score (Bills et al. 2023; EleutherAI delphi's "detection"): on the held-out windows where the
latent is active and the held-out windows where it is not (random text, and near misses from the quantile
examples), does the explanation say the latent fires in the window? Stored: precision, recall and the
balanced accuracy (the mean of the recalls of both kinds: 0.5 is chance, whatever the mix) as the score. A
pattern found in every window ("a space") scores 0.5, however often the latent fires on spaces.
Latents with fewer than MIN_FIRES firings get no explanation, and a note that says so.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from nanosae.errors import FormatError
from nanosae.interp.featuredb import FeatureDB
from nanosae.interp.featuredb import db_path as db_path_of
from nanosae.io import read_json, sha256_file, write_json, write_lock

log = logging.getLogger(__name__)

WILDCARD = None
ACTIVE_FRACTION = 0.25
MIN_FIRES = 20
BUILD_OTHERS = 32  # random windows a pattern is built against (a pattern found everywhere matches most of them)
SCORE_OTHERS = 64  # random windows an explanation is scored on (enough to measure how often it says "fires")
Pattern = tuple  # tokens from oldest to the activating one; None = any token


class Example(NamedTuple):
    tokens: list[str]
    acts: list[float]


class Evidence(NamedTuple):
    """What a latent's explanation is built and scored on."""

    examples: list[Example]
    """Top examples by rank, then quantile examples by rank."""
    others: list[Example]
    """Random windows of the text, with this latent's activation on each token (mostly zero)."""
    max_act: float
    fires: int

    @property
    def threshold(self) -> float:
        return ACTIVE_FRACTION * self.max_act

    def split(self) -> tuple[list[Example], list[Example]]:
        """(building windows, held-out windows): even- and odd-ranked examples, and disjoint sets of random
        windows (BUILD_OTHERS to keep over-general patterns out, SCORE_OTHERS to score on)."""
        build = self.others[0 : 2 * BUILD_OTHERS : 2]
        held_out = self.others[1::2][:SCORE_OTHERS]
        return self.examples[0::2] + build, self.examples[1::2] + held_out


class Detection(NamedTuple):
    precision: float
    recall: float
    score: float
    """Balanced accuracy: (recall on active windows + recall on inactive windows) / 2."""


def by_activity(windows: list[Example], threshold: float) -> tuple[list[Example], list[Example]]:
    """(windows where the latent is active somewhere, windows where it is not), in their order."""
    active = [w for w in windows if max(w.acts, default=0.0) >= threshold]
    return active, [w for w in windows if max(w.acts, default=0.0) < threshold]


def detection(says_active: Callable[[list[str]], bool], windows: list[Example], threshold: float) -> Detection | None:
    """Window-level detection of "the latent is active here" against the truth; None without windows of
    both kinds."""
    active, silent = by_activity(windows, threshold)
    if not active or not silent:
        return None
    tp = sum(bool(says_active(w.tokens)) for w in active)
    fp = sum(bool(says_active(w.tokens)) for w in silent)
    recall = tp / len(active)
    return Detection(tp / (tp + fp) if tp + fp else 0.0, recall, (recall + 1 - fp / len(silent)) / 2)


# ---- N2G patterns ------------------------------------------------------------------------------------------
def found_in(patterns: list[Pattern], tokens: list[str]) -> bool:
    """Whether any pattern matches anywhere in a window (patterns are candidates of some window, so matching
    one is being among this window's candidates)."""
    present = _patterns_in(tuple(tokens))
    return any(tuple(p) in present for p in patterns)


@functools.lru_cache(maxsize=1 << 16)
def _patterns_at(tokens: tuple) -> tuple:
    """Every position's candidate patterns (none at empty tokens). Cached: the random windows are the same for
    every latent."""
    return tuple(tuple(candidates(list(tokens), pos)) if tok else () for pos, tok in enumerate(tokens))


@functools.lru_cache(maxsize=1 << 16)
def _patterns_in(tokens: tuple) -> frozenset:
    return frozenset(c for at in _patterns_at(tokens) for c in at)


def candidates(tokens: list[str], pos: int) -> list[Pattern]:
    t = tokens
    out: list[Pattern] = [(t[pos],)]
    if pos >= 1 and t[pos - 1]:
        out.append((t[pos - 1], t[pos]))
    if pos >= 2 and t[pos - 2]:
        out += [(t[pos - 2], WILDCARD, t[pos]), (t[pos - 2], t[pos - 1], t[pos])]
    return out


def f1(patterns: list[Pattern], examples: list[Example], threshold: float) -> tuple[float, float, float]:
    """(precision, recall, F1) of 'some pattern matches here' against 'activation ≥ threshold here', per token."""
    index, active = _index(examples, threshold)
    return _score(set().union(*(index.get(p, set()) for p in patterns)) if patterns else set(), active)


def _index(examples: list[Example], threshold: float) -> tuple[dict[Pattern, set], set]:
    """Every candidate pattern -> the positions (example, pos) it matches; and the strongly active positions."""
    index: dict[Pattern, set] = {}
    active = set()
    for e, ex in enumerate(examples):
        for pos, at in enumerate(_patterns_at(tuple(ex.tokens))):
            for c in at:
                index.setdefault(c, set()).add((e, pos))
            if at and ex.acts[pos] >= threshold:
                active.add((e, pos))
    return index, active


def _score(predicted: set, active: set) -> tuple[float, float, float]:
    tp = len(predicted & active)
    precision = tp / len(predicted) if predicted else 0.0
    recall = tp / len(active) if active else 0.0
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def build_patterns(windows: list[Example], threshold: float, max_patterns: int = 3) -> list[Pattern]:
    """Greedy: the candidate that most raises token-level F1 on the windows, up to max_patterns."""
    index, active = _index(windows, threshold)
    pool = {
        c for (e, pos) in active for c in _patterns_at(tuple(windows[e].tokens))[pos] if len(index[c] & active) >= 2
    }
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
    return chosen


def explain_latent(evidence: Evidence) -> tuple[list[Pattern], Detection | None]:
    """Patterns built on the building windows, and their detection score on the held-out ones."""
    build, held_out = evidence.split()
    if evidence.max_act <= 0 or not build:
        return [], None
    patterns = build_patterns(build, evidence.threshold)
    if not patterns:
        return [], None
    return patterns, detection(lambda tokens: found_in(patterns, tokens), held_out, evidence.threshold)


def describe(patterns: list[Pattern]) -> str:
    """Human-readable: each pattern as quoted tokens, '*' for a wildcard, alternatives joined by ' | '."""
    return " | ".join(
        " ".join("*" if t is WILDCARD else json.dumps(t, ensure_ascii=False) for t in p) for p in patterns
    )


# ---- writing them into features.db ---------------------------------------------------------------------------
Explainer = Callable[[Evidence], tuple[str | None, Detection | None]]


PARTIAL_EVERY = 10  # latents between saves of an unfinished pass (an LLM pass is seconds a latent)


def write_explanations(
    db_path: str | Path,
    explain_one: Explainer,
    method: str,
    most_frequent_first: bool = False,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    explainer: str = "",
) -> int:
    """Explain every latent that fired (or the `limit` most frequent) and write all rows in one transaction;
    latents with too little evidence get a note instead. Returns how many got an explanation.

    Resumable: the rows so far are saved beside the database (DB.explain.partial.json, atomically) every
    PARTIAL_EVERY latents; the same pass run again (same database contents, method, explainer, limit and order)
    continues after them, any other pass starts over."""
    path = db_path_of(db_path)
    partial = path.with_name(path.name + ".explain.partial.json")
    with write_lock(path, directory=False):
        db = FeatureDB(db_path, readonly=False)
        try:
            fingerprint = {
                "db": sha256_file(path),
                "method": method,
                "explainer": explainer,
                "limit": limit,
                "most_frequent_first": most_frequent_first,
            }
            latents = db.to_explain(most_frequent_first, limit)
            windows = RandomText(db.random_windows()[: 2 * max(BUILD_OTHERS, SCORE_OTHERS)])
            updates = _resumed(partial, fingerprint)
            for n, row in enumerate(latents):
                if n < len(updates):
                    continue
                text, found, note = _explain_row(db, row, windows, explain_one)
                updates.append(
                    [
                        text,
                        None if found is None else round(found.score, 4),
                        None if found is None else round(found.precision, 4),
                        None if found is None else round(found.recall, 4),
                        method,
                        note,
                        row["id"],
                    ]
                )
                if (n + 1) % PARTIAL_EVERY == 0:
                    write_json(partial, {"fingerprint": fingerprint, "updates": updates})
                if progress is not None:
                    progress(n + 1, len(latents))
            db.set_explanations([tuple(u) for u in updates])
        finally:
            db.close()
        partial.unlink(missing_ok=True)
    return sum(u[0] is not None for u in updates)


def _resumed(partial: Path, fingerprint: dict) -> list[list]:
    """The rows an interrupted run of this same pass saved (none for another pass, or an unreadable file)."""
    if not partial.exists():
        return []
    try:
        saved = read_json(partial)
    except FormatError as e:
        log.warning("%s is unreadable (%s); explaining from the start", partial, e)
        return []
    rows = saved.get("updates")
    if (
        saved.get("fingerprint") != fingerprint
        or not isinstance(rows, list)
        or not all(isinstance(r, list) and len(r) == 7 for r in rows)
    ):
        return []
    return rows


class RandomText:
    """The random windows of features.db, indexed by latent once (not searched again for every latent)."""

    def __init__(self, windows: list[tuple[list[str], list[dict[str, float]]]]):
        self.tokens = [tokens for tokens, _ in windows]
        self.firing: dict[int, list[tuple[int, int, float]]] = {}
        for w, (_, latents) in enumerate(windows):
            for pos, per_token in enumerate(latents):
                for latent, act in per_token.items():
                    self.firing.setdefault(int(latent), []).append((w, pos, act))

    def of(self, latent: int) -> list[Example]:
        """The windows with this latent's activation on every token."""
        acts = [[0.0] * len(tokens) for tokens in self.tokens]
        for w, pos, act in self.firing.get(latent, ()):
            acts[w][pos] = act
        return [Example(tokens, a) for tokens, a in zip(self.tokens, acts)]


def _explain_row(
    db: FeatureDB, row: Any, windows: RandomText, explain_one: Explainer
) -> tuple[str | None, Detection | None, str | None]:
    if row["fires"] < MIN_FIRES:
        return None, None, f"fired {row['fires']} times in the text read: too few to explain (needs {MIN_FIRES})"
    examples = [
        Example(db.cell(r["tokens"], "example tokens"), db.cell(r["acts"], "example acts"))
        for r in db.examples(row["id"])
    ]
    text, found = explain_one(Evidence(examples, windows.of(row["id"]), row["max_act"], row["fires"]))
    if text is None:
        return None, None, "no pattern predicts where it fires"
    if found is None:
        return text, None, "not scored: no held-out windows where it is silent (it fires almost everywhere)"
    return text, found, None


def explain_n2g(db_path: str | Path, progress: Callable[[int, int], None] | None = None) -> int:
    """Write an N2G explanation and its detection score for every latent with enough evidence; returns how many."""

    def one(evidence: Evidence) -> tuple[str | None, Detection | None]:
        patterns, found = explain_latent(evidence)
        return (describe(patterns) if patterns else None), found

    return write_explanations(db_path, one, "n2g", progress=progress)
