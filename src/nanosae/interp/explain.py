"""Explanations and how honestly they are scored.

Evidence for a latent: its top and quantile examples (token windows with the latent's activation on every
token) and the random windows of the text stored in features.db: natural text, sampled uniformly during the
feature pass, with every latent's activation on every token. A token is "active" when the latent reaches 25%
of its maximum there; a window is active when some token of it is.

Built on, scored on (never both): an explanation is built from the examples and the random windows of
even-numbered documents, and scored on the random windows of odd-numbered documents alone (by window number
where documents are unknown), natural text that played no part in choosing the examples or the explanation.
There the latent is active in as many windows as it happens to be (across its whole range of activations, not
only its strongest), and silent in the rest. Windows of one document share its subject: each proportion's
variance is the document-clustered one where that is larger than Agresti-Coull's.

N2G patterns: a token sequence ending at the activating token, with optional wildcards ("*"), each token
exact or folded (~: any case, with or without a leading space, so " decimal" and "Decimal" are one pattern):
(t0), (t-1, t0), (t-2, *, t0), (t-2, t-1, t0). Chosen greedily while each raises the token-level F1 of
predicting active tokens on the building windows, silent text included, so a pattern that also matches
where the latent is silent is not chosen.

Detection score (Bills et al. 2023; EleutherAI delphi's "detection"): does the explanation say the latent
fires in a held-out window? The score is a balanced accuracy with a fixed mix: half the recall on active
windows, half the accuracy on silent ones, and the silent half split evenly between random silent windows and
hard negatives (silent windows holding one of the tokens the latent fires on most, i.e. windows where a
reader of the explanation would expect it to fire). 0.5 is chance; a pattern found in every window scores
0.5. Stored with it: the windows' natural precision, the recall, the token-level F1 on the held-out text
(patterns predict tokens), the counts, and a 95% interval (Agresti-Coull for each proportion: p̃ = (x+2)/(n+4),
var = p̃(1-p̃)/(n+4), combined with the mix's weights). With an interval wider than ±MAX_HALF_WIDTH there is
too little evidence for a number: the score is left empty and the note says why.
Latents with fewer than MIN_FIRES firings get no explanation, and a note that says so.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, NamedTuple

from nanosae.config import DENSE_THRESHOLD
from nanosae.errors import FormatError
from nanosae.interp.featuredb import EXPLANATION_FIELDS, FeatureDB
from nanosae.interp.featuredb import db_path as db_path_of
from nanosae.io import read_json, sha256_file, write_json, write_lock

log = logging.getLogger(__name__)

WILDCARD = None
FOLD = "\x00"  # a folded pattern token starts with it (shown as ~"x"): any case, with or without a leading space
ACTIVE_FRACTION = 0.25
MIN_FIRES = 20
MAX_HALF_WIDTH = 0.1  # a score's 95% interval must be this narrow to be stated
HARD_TOKENS = 5  # the latent's most frequent activating tokens that make a silent window a hard negative
SHARED_RUN = 8  # two windows sharing this many consecutive tokens show the same passage
BUILD_RANDOM = 64  # building random windows besides those where the latent is active or a hard negative
Z95 = 1.96
Pattern = tuple  # tokens from oldest to the activating one; None = any token


class Example(NamedTuple):
    tokens: list[str]
    acts: list[float]
    doc: int = -1
    """The document the window is in (-1: unknown): windows of one document are not independent evidence."""


class Evidence(NamedTuple):
    """What a latent's explanation is built and scored on."""

    examples: list[Example]
    """Top examples by rank, then quantile examples by rank."""
    others: list[Example]
    """Random windows of the text, with this latent's activation on each token."""
    max_act: float
    fires: int
    latent: int = -1
    """Which latent (for explainers that look it up, such as your own lines)."""

    @property
    def threshold(self) -> float:
        return ACTIVE_FRACTION * self.max_act

    def split(self) -> tuple[list[Example], list[Example]]:
        """(building windows, held-out windows): the examples and even-numbered random windows build (the first
        BUILD_RANDOM of them, and every other one where the latent is active or that is a hard negative); the
        odd-numbered random windows, natural text alone, score. Where the windows' documents are known, a
        window's document decides its side (even documents build, odd ones score), so no held-out window shares
        a document with a building one."""
        known = all(w.doc >= 0 for w in self.others) and bool(self.others)
        side = (lambda k, w: w.doc % 2) if known else (lambda k, w: k % 2)
        even = [w for k, w in enumerate(self.others) if side(k, w) == 0]
        odd = [w for k, w in enumerate(self.others) if side(k, w) == 1]
        hard = self.hard_tokens()
        useful = [
            w for w in even[BUILD_RANDOM:] if max(w.acts, default=0.0) >= self.threshold or is_hard(w.tokens, hard)
        ]
        build = self.examples + even[:BUILD_RANDOM] + useful
        seen = frozenset().union(*(_runs(tuple(w.tokens)) for w in build))
        # a held-out window showing a passage the explanation was built on (the same text elsewhere) is not held out
        return build, [w for w in odd if not _runs(tuple(w.tokens)) & seen]

    def hard_tokens(self) -> set[str]:
        """The folded tokens the latent is active on most often in its examples."""
        counts: dict[str, int] = {}
        for ex in self.examples:
            for tok, act in zip(ex.tokens, ex.acts):
                if tok and act >= self.threshold:
                    counts[fold(tok)] = counts.get(fold(tok), 0) + 1
        return set(sorted(counts, key=lambda t: (-counts[t], t))[:HARD_TOKENS])


class Detection(NamedTuple):
    precision: float
    """Of the held-out windows where the explanation says "fires", the share where the latent is active."""
    recall: float
    score: float
    """Balanced accuracy with the fixed mix (see the module docstring)."""
    low: float
    high: float
    """The score's 95% interval."""
    n_active: int
    n_silent: int
    n_hard: int
    """Held-out windows: active, silent, and of the silent ones the hard negatives."""
    f1: float | None = None
    """Token-level F1 on the held-out windows (explanations that predict tokens: N2G patterns)."""
    half: float = 0.0
    """The interval's half-width before low and high are clipped to [0, 1] (a score of 1 on three windows is
    1.00 [0.83, 1.00], and still ±0.17)."""

    @property
    def half_width(self) -> float:
        return self.half

    @property
    def sure(self) -> bool:
        """Enough evidence to state the score (its interval is within ±MAX_HALF_WIDTH)."""
        return self.half_width <= MAX_HALF_WIDTH


@functools.lru_cache(maxsize=1 << 16)
def _runs(tokens: tuple) -> frozenset:
    """The window's runs of SHARED_RUN consecutive tokens (empty tokens, padding, break a run)."""
    return frozenset(
        tokens[j : j + SHARED_RUN] for j in range(len(tokens) - SHARED_RUN + 1) if all(tokens[j : j + SHARED_RUN])
    )


def fold(token: str) -> str:
    """A token in any case, with or without a leading space (SentencePiece's ▁ and GPT-2's Ġ included)."""
    return token.lstrip(" ▁Ġ").lower()


def proportion_variance(hits: int, n: int) -> float:
    """Agresti-Coull's variance of a proportion (95%): p̃ = (x+2)/(n+4), var = p̃(1-p̃)/(n+4)."""
    p = (hits + 2) / (n + 4)
    return p * (1 - p) / (n + 4)


def variance(outcomes: list[bool], windows: list[Example]) -> float:
    """A proportion's variance: Agresti-Coull's, or where the windows' documents are known and it is larger,
    the document-clustered one."""
    plain = proportion_variance(sum(outcomes), len(outcomes))
    docs = [w.doc for w in windows]
    return max(plain, clustered_variance(outcomes, docs)) if any(d >= 0 for d in docs) else plain


def clustered_variance(outcomes: list[bool], docs: list[int]) -> float:
    """The variance of a proportion when its windows come in documents (the cluster-robust, "sandwich" form
    G/(G-1) · Σ_g (x_g − p n_g)² / n², G documents): windows of one document share its subject, so they count
    for less than independent ones. Windows of unknown documents (-1) each count as their own."""
    n = len(outcomes)
    if not n:
        return 0.0
    p = sum(outcomes) / n
    groups: dict[Any, list[int]] = {}
    for k, (hit, doc) in enumerate(zip(outcomes, docs)):
        g = groups.setdefault(doc if doc >= 0 else ("window", k), [0, 0])
        g[0] += hit
        g[1] += 1
    if len(groups) < 2:
        return p * (1 - p)  # one document: as uncertain as a single window
    spread = sum((x - p * m) ** 2 for x, m in groups.values())
    return len(groups) / (len(groups) - 1) * spread / n**2


def by_activity(windows: list[Example], threshold: float) -> tuple[list[Example], list[Example]]:
    """(windows where the latent is active somewhere, windows where it is not), in their order."""
    active = [w for w in windows if max(w.acts, default=0.0) >= threshold]
    return active, [w for w in windows if max(w.acts, default=0.0) < threshold]


def is_hard(tokens: list[str], hard: AbstractSet[str]) -> bool:
    return bool(hard) and not _folded(tuple(tokens)).isdisjoint(hard)


@functools.lru_cache(maxsize=1 << 16)
def _folded(tokens: tuple) -> frozenset:
    """The window's tokens folded (cached: the random windows are the same for every latent)."""
    return frozenset(fold(t) for t in tokens if t)


def detection(
    says_active: Callable[[list[str]], bool],
    windows: list[Example],
    threshold: float,
    hard: AbstractSet[str] = frozenset(),
) -> Detection | None:
    """Window-level detection of "the latent is active here" on held-out windows; None without windows of
    both kinds. hard: the folded tokens whose silent windows are hard negatives."""
    active, silent = by_activity(windows, threshold)
    if not active or not silent:
        return None
    hard_silent = [w for w in silent if is_hard(w.tokens, hard)]
    random_silent = [w for w in silent if not is_hard(w.tokens, hard)]
    said = lambda ws: [bool(says_active(w.tokens)) for w in ws]
    on_active, on_hard, on_random = said(active), said(hard_silent), said(random_silent)
    tp, fp = sum(on_active), sum(on_hard) + sum(on_random)
    recall = tp / len(active)
    # the silent half: random and hard negatives weighed equally (all of one kind when the other is missing);
    # each proportion's variance is Agresti-Coull's, or the document-clustered one where that is larger
    right = [([not s for s in on], ws) for on, ws in ((on_random, random_silent), (on_hard, hard_silent)) if ws]
    specificity = sum(sum(r) / len(r) for r, _ in right) / len(right)
    var_specificity = sum(variance(r, ws) for r, ws in right) / len(right) ** 2
    score = (recall + specificity) / 2
    half = Z95 * math.sqrt((variance(on_active, active) + var_specificity) / 4)
    return Detection(
        tp / (tp + fp) if tp + fp else 0.0,
        recall,
        score,
        max(0.0, score - half),
        min(1.0, score + half),
        len(active),
        len(silent),
        len(hard_silent),
        half=half,
    )


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
    """The patterns ending at pos: each shape with its tokens exact, and with them folded."""
    t = tokens
    shapes: list[Pattern] = [(t[pos],)]
    if pos >= 1 and t[pos - 1]:
        shapes.append((t[pos - 1], t[pos]))
    if pos >= 2 and t[pos - 2]:
        shapes += [(t[pos - 2], WILDCARD, t[pos]), (t[pos - 2], t[pos - 1], t[pos])]
    folded = [tuple(WILDCARD if x is WILDCARD else FOLD + fold(x) for x in shape) for shape in shapes]
    return shapes + folded


def f1(patterns: list[Pattern], examples: list[Example], threshold: float) -> tuple[float, float, float]:
    """(precision, recall, F1) of 'some pattern matches here' against 'activation ≥ threshold here', per token."""
    index, active = _index(examples, threshold, only=frozenset(tuple(p) for p in patterns))
    return _score(set().union(*(index.get(p, set()) for p in patterns)) if patterns else set(), active)


def _index(
    examples: list[Example], threshold: float, only: AbstractSet | None = None
) -> tuple[dict[Pattern, set], set]:
    """Every candidate pattern (or those in `only`) -> the positions (example, pos) it matches; and the
    strongly active positions."""
    index: dict[Pattern, set] = {}
    active: set[tuple[int, int]] = set()
    for e, ex in enumerate(examples):
        tokens = tuple(ex.tokens)
        if max(ex.acts, default=0.0) >= threshold:
            active.update((e, pos) for pos, at in enumerate(_patterns_at(tokens)) if at and ex.acts[pos] >= threshold)
        present = _patterns_in(tokens) if only is None else _patterns_in(tokens) & only  # a set operation in C
        for c in present:
            index.setdefault(c, set()).update((e, pos) for pos in _positions(tokens)[c])
    return index, active


@functools.lru_cache(maxsize=1 << 16)
def _positions(tokens: tuple) -> dict:
    """Each candidate pattern of a window -> the positions where it ends."""
    out: dict[Pattern, list[int]] = {}
    for pos, at in enumerate(_patterns_at(tokens)):
        for c in at:
            out.setdefault(c, []).append(pos)
    return out


def _score(predicted: set, active: set) -> tuple[float, float, float]:
    tp = len(predicted & active)
    precision = tp / len(predicted) if predicted else 0.0
    recall = tp / len(active) if active else 0.0
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def build_patterns(windows: list[Example], threshold: float, max_patterns: int = 8) -> list[Pattern]:
    """Greedy: the candidate that most raises token-level F1 on the windows, while it raises F1 (at most
    max_patterns). Longer patterns, and folded ones, pay a small price, so a simpler one wins a tie."""
    _, active = _index(windows, threshold, only=frozenset())
    at_active: dict[Pattern, int] = {}
    for e, pos in active:
        for c in _patterns_at(tuple(windows[e].tokens))[pos]:
            at_active[c] = at_active.get(c, 0) + 1
    pool = frozenset(c for c, n in at_active.items() if n >= 2)  # the candidates worth scoring
    index, _ = _index(windows, threshold, only=pool)
    cost = lambda c: 0.01 * len(c) + 0.005 * any(isinstance(x, str) and x.startswith(FOLD) for x in c)
    chosen: list[Pattern] = []
    covered: set = set()
    best = 0.0
    for _ in range(max_patterns):
        scored = [(_score(covered | index[c], active)[2] - cost(c), c) for c in pool if c not in chosen]
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
    found = detection(lambda tokens: found_in(patterns, tokens), held_out, evidence.threshold, evidence.hard_tokens())
    return patterns, None if found is None else found._replace(f1=f1(patterns, held_out, evidence.threshold)[2])


def describe(patterns: list[Pattern]) -> str:
    """Human-readable: each pattern as quoted tokens, '*' for a wildcard, ~"x" for a folded token (any case,
    with or without a leading space), alternatives joined by ' | '."""
    word = lambda t: (
        "*"
        if t is WILDCARD
        else "~" + json.dumps(t[1:], ensure_ascii=False)
        if t.startswith(FOLD)
        else json.dumps(t, ensure_ascii=False)
    )
    return " | ".join(" ".join(word(t) for t in p) for p in patterns)


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
    interesting_only: bool = False,
    only: set[int] | None = None,
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
                "interesting_only": interesting_only,
                "only": sorted(only) if only is not None else None,
            }
            latents = db.to_explain(
                most_frequent_first,
                limit,
                MIN_FIRES if interesting_only else 1,
                DENSE_THRESHOLD if interesting_only else 1.0,
            )
            if only is not None:
                latents = [r for r in latents if r["id"] in only]
            windows = RandomText(db.random_windows())
            updates = _resumed(partial, fingerprint)
            for n, row in enumerate(latents):
                if n < len(updates):
                    continue
                text, found, note = _explain_row(db, row, windows, explain_one)
                updates.append([*explanation_fields(text, method, note, found), row["id"]])
                if (n + 1) % PARTIAL_EVERY == 0:
                    write_json(partial, {"fingerprint": fingerprint, "updates": updates})
                if progress is not None:
                    progress(n + 1, len(latents))
            db.set_explanations([tuple(u) for u in updates])
        finally:
            db.close()
        partial.unlink(missing_ok=True)
    return sum(u[0] is not None for u in updates)


def explanation_fields(text: str | None, method: str, note: str | None, found: Detection | None) -> list[Any]:
    """The values of EXPLANATION_FIELDS: the score only when its interval is narrow enough to state it."""
    if found is None:
        return [text, method, note] + [None] * (len(EXPLANATION_FIELDS) - 3)
    r = lambda x: None if x is None else round(x, 4)
    return [
        text,
        method,
        note,
        r(found.score) if found.sure else None,
        r(found.low),
        r(found.high),
        r(found.precision),
        r(found.recall),
        r(found.f1),
        found.n_active,
        found.n_silent,
        found.n_hard,
    ]


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
        or not all(isinstance(r, list) and len(r) == len(EXPLANATION_FIELDS) + 1 for r in rows)
    ):
        return []
    return rows


class RandomText:
    """The random windows of features.db, indexed by latent once (not searched again for every latent)."""

    def __init__(self, windows: list[tuple[list[str], list[dict[str, float]], int]]):
        self.tokens = [tokens for tokens, _, _ in windows]
        self.docs = [doc for _, _, doc in windows]
        self.firing: dict[int, list[tuple[int, int, float]]] = {}
        for w, (_, latents, _) in enumerate(windows):
            for pos, per_token in enumerate(latents):
                for latent, act in per_token.items():
                    self.firing.setdefault(int(latent), []).append((w, pos, act))

        self.silent = [[0.0] * len(tokens) for tokens in self.tokens]  # shared, never written to

    def of(self, latent: int) -> list[Example]:
        """The windows with this latent's activation on every token (a window where it is silent shares one
        list of zeros: thousands of windows and latents would otherwise copy them all)."""
        acts = list(self.silent)
        for w, pos, act in self.firing.get(latent, ()):
            if acts[w] is self.silent[w]:
                acts[w] = list(self.silent[w])
            acts[w][pos] = act
        return [Example(tokens, a, doc) for tokens, a, doc in zip(self.tokens, acts, self.docs)]


def _explain_row(
    db: FeatureDB, row: Any, windows: RandomText, explain_one: Explainer
) -> tuple[str | None, Detection | None, str | None]:
    if row["fires"] < MIN_FIRES:
        return None, None, f"fired {row['fires']} times in the text read: too few to explain (needs {MIN_FIRES})"
    examples = [
        Example(db.cell(r["tokens"], "example tokens"), db.cell(r["acts"], "example acts"))
        for r in db.examples(row["id"])
    ]
    text, found = explain_one(Evidence(examples, windows.of(row["id"]), row["max_act"], row["fires"], row["id"]))
    if text is None:
        return None, None, "no pattern predicts where it fires"
    if found is None:
        return text, None, "not scored: the held-out text has no window where it is active, or none where it is silent"
    if not found.sure:
        return (
            text,
            found,
            (
                f"too little held-out evidence for a score: {found.n_active} active and {found.n_silent} silent "
                f"windows give {found.low:.2f}..{found.high:.2f}"
            ),
        )
    return text, found, None


def explain_n2g(db_path: str | Path, progress: Callable[[int, int], None] | None = None) -> int:
    """Write an N2G explanation and its detection score for every latent with enough evidence; returns how many."""

    def one(evidence: Evidence) -> tuple[str | None, Detection | None]:
        patterns, found = explain_latent(evidence)
        return (describe(patterns) if patterns else None), found

    return write_explanations(db_path, one, "n2g", progress=progress)
