"""Sparse probing: do single latents carry concepts a linear probe finds in the dense activations?

Token-level tasks whose labels are exact, derived from local text with Python's own `tokenize` and simple
rules (held-out files of the standard library for code; the Python docs for prose):
  string       the token starts inside a string literal           (code)
  comment      ... inside a comment                                (code)
  keyword      ... inside a keyword (keyword.kwlist)               (code)
  brackets     ... strictly between (), [] or {} brackets         (code)
  digit        the token holds a digit                             (prose)
  capitalised  the token is a capitalised word (" The", "Python") (prose)
  sentence     the token starts a sentence                         (prose)
plus user tasks: JSONL lines {"text": ..., "labels": 0/1} (one label per document: the mean activation over
its tokens) or {"text": ..., "labels": [0/1 per token of the text]}.

A token's label is the label of its first non-space character. Per task, a balanced sample of positives and
negatives is split into train and test; reported are the test accuracy of a logistic probe on the dense
activations, on all SAE latents, and k-sparse probes on the k latents (and k dense dimensions) whose mean
differs most between the classes, k in ks — SAEBench's sparse probing, on local text.
"""

from __future__ import annotations

import io
import keyword
import random
import re
import statistics
import tokenize
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nanosae.config import DataConfig, check_range
from nanosae.data.corpus import iter_documents
from nanosae.errors import ConfigError, DataError, FormatError
from nanosae.eval.probes import accuracy, fit_logistic, k_sparse_probe
from nanosae.io import parse_json, regular_file
from nanosae.models import HostModel
from nanosae.sae import SAE

CODE_TASKS = ("string", "comment", "keyword", "brackets")
PROSE_TASKS = ("digit", "capitalised", "sentence")
OPEN, CLOSE = "([{", ")]}"


@dataclass
class ProbingConfig:
    code: list[str] = field(default_factory=lambda: ["builtin:stdlib"])
    prose: list[str] = field(default_factory=lambda: ["builtin:pydocs"])
    user_tasks: list[str] = field(default_factory=list)
    """JSONL files of {"text", "labels"}: a task each, named by the file."""
    windows: int = 64
    """Token windows read from each corpus."""
    context_size: int = 128
    per_class: int = 400
    """Positives and negatives sampled per task (fewer when the text has fewer)."""
    test_fraction: float = 0.3
    ks: tuple[int, ...] = (1, 2, 5, 20)
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.ks = tuple(self.ks)
        for name in ("windows", "context_size", "per_class", "batch_size"):
            check_range(name, getattr(self, name), 1)
        check_range("ks", list(self.ks), 1)
        check_range("test_fraction", self.test_fraction, 0, 1, open_low=True, open_high=True)


# ---- labels from text ------------------------------------------------------------------------------------
def code_labels(text: str) -> dict[str, list[bool]] | None:
    """Per character: inside a string, a comment, a keyword, brackets; None when tokenize cannot read it."""
    n = len(text)
    labels = {task: [False] * n for task in CODE_TASKS}
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    at = lambda pos: line_starts[pos[0] - 1] + pos[1]
    depth = [0] * (n + 1)
    string_kinds = {tokenize.STRING} | {
        getattr(tokenize, k)
        for k in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END", "TSTRING_START", "TSTRING_MIDDLE", "TSTRING_END")
        if hasattr(tokenize, k)
    }
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            start, end = at(tok.start), at(tok.end)
            if tok.type in string_kinds:
                kind = "string"
            elif tok.type == tokenize.COMMENT:
                kind = "comment"
            elif tok.type == tokenize.NAME and keyword.iskeyword(tok.string):
                kind = "keyword"
            else:
                kind = None
                if tok.type == tokenize.OP and tok.string in OPEN:
                    depth[end] += 1
                elif tok.type == tokenize.OP and tok.string in CLOSE:
                    depth[start] -= 1
            if kind:
                labels[kind][start:end] = [True] * (end - start)
    except (tokenize.TokenError, SyntaxError, IndentationError, ValueError):
        return None
    level = 0
    for i in range(n):
        level += depth[i]
        labels["brackets"][i] = level > 0
    # an f-string's replacement fields are code inside the string: they count as string here
    return labels


def prose_labels(text: str) -> dict[str, list[bool]]:
    """Per character: a digit, the first letter of a capitalised word, the first letter of a sentence."""
    digit = [c.isdigit() for c in text]
    capital = [False] * len(text)
    for m in re.finditer(r"\b[A-Z][a-z]", text):
        capital[m.start()] = True
    sentence = [False] * len(text)
    for m in re.finditer(r"(?:\A|[.!?]\s+|\n\s*\n\s*)([A-Za-z])", text):
        sentence[m.start(1)] = True
    return {"digit": digit, "capitalised": capital, "sentence": sentence}


def token_offsets(tokenizer, ids: list[int], text: str) -> list[int] | None:
    """Where each token's text starts in text; None when the tokens do not decode piecewise to the text."""
    pieces = [tokenizer.decode([i]) for i in ids]
    if "".join(pieces) != text:
        return None
    starts, pos = [], 0
    for piece in pieces:
        starts.append(pos)
        pos += len(piece)
    return starts


def _first_char(text: str, start: int, end: int) -> int:
    """The token's first non-space character (its first character when it is all space)."""
    for i in range(start, end):
        if not text[i].isspace():
            return i
    return start


# ---- activations ------------------------------------------------------------------------------------------
@torch.no_grad()
def window_activations(model: HostModel, hook: str, windows: list[list[int]], batch_size: int) -> list[Tensor]:
    """(len(window), d) activations at the hook per token window of any length (each padded after its end, which
    a causal model never reads), the pass stopped after the hook's block."""
    out = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        width = max(map(len, batch))
        tokens = torch.tensor([w + [model.tokenizer.bos_id] * (width - len(w)) for w in batch])
        _, cache = model.run_with_cache(tokens, [hook], return_logits=False)
        out += [cache[hook][j, : len(w)].float().cpu() for j, w in enumerate(batch)]
    return out


def _labelled_windows(
    model: HostModel, specs: list[str], labeller, cfg: ProbingConfig, split: str
) -> tuple[list[list[int]], list[dict[str, list[bool]]]]:
    """Token windows of the documents and each token's labels (BOS first, unlabelled)."""
    tok, body = model.tokenizer, cfg.context_size - 1
    windows, labels = [], []
    for text in iter_documents(DataConfig(specs=specs, split=split)):
        chars = labeller(text)
        ids = tok.encode(text)
        starts = token_offsets(tok, ids, text) if chars is not None else None
        if starts is None:
            continue
        ends = starts[1:] + [len(text)]
        for w in range(0, len(ids), body):
            span = range(w, min(w + body, len(ids)))
            if len(span) < 8:
                continue
            firsts = [_first_char(text, starts[i], ends[i]) if ends[i] > starts[i] else None for i in span]
            windows.append([tok.bos_id] + [ids[i] for i in span])
            labels.append(
                {task: [None] + [None if f is None else values[f] for f in firsts] for task, values in chars.items()}
            )
            if len(windows) >= cfg.windows:
                return windows, labels
    if not windows:
        raise DataError(f"no usable held-out text in {', '.join(specs)} for the probing tasks")
    return windows, labels


USER_TASK_LIMIT = 64 << 20  # bytes: a probing task is labelled text, not a corpus


def read_user_task(path: str | Path) -> list[tuple[int, str, int | list[int]]]:
    """(line, text, labels) of a JSONL probing task, every line checked before anything runs: {"text": non-empty
    text, "labels": 0/1 (the document) or a list of 0/1 (one per token)}. A one-line DataError otherwise."""
    path = Path(path)
    try:
        regular_file(path)
        if not path.exists():
            raise DataError(f"probing task {path} does not exist")
        if path.stat().st_size > USER_TASK_LIMIT:
            raise DataError(f"probing task {path} is over {USER_TASK_LIMIT >> 20} MB")
        text_of_file = path.read_bytes().decode("utf-8")
    except FormatError as e:
        raise DataError(str(e)) from None
    except UnicodeDecodeError:
        raise DataError(f"probing task {path} is not UTF-8 text") from None
    is_label = lambda v: isinstance(v, (bool, int)) and v in (0, 1)
    records: list[tuple[int, str, Any]] = []
    for n, line in enumerate(text_of_file.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = parse_json(line, where)
        except FormatError as e:
            raise DataError(str(e)) from None
        if not isinstance(record, dict):
            raise DataError(f'{where}: expected a JSON object with "text" and "labels"')
        text, labels = record.get("text"), record.get("labels")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{where}: "text" must be non-empty text')
        if not (is_label(labels) or (isinstance(labels, list) and labels and all(is_label(v) for v in labels))):
            raise DataError(f'{where}: "labels" must be 0/1, or a list of 0/1 with one per token')
        records.append((n, text, labels))
    if not records:
        raise DataError(f"probing task {path}: no examples")
    return records


def _user_task(model: HostModel, hook: str, path: Path, cfg: ProbingConfig) -> tuple[Tensor, Tensor]:
    """(activations, labels) of a JSONL task: a document label averages its tokens, token labels each."""
    tok = model.tokenizer
    xs, ys = [], []
    for n, text, labels in read_user_task(path):
        all_ids = tok.encode(text)
        ids = all_ids[: cfg.context_size - 1]
        if not ids:
            raise DataError(f'{path}:{n}: "text" gives no tokens')
        acts = window_activations(model, hook, [[tok.bos_id] + ids], 1)[0][1:]
        if not isinstance(labels, list):
            xs.append(acts.mean(0, keepdim=True))
            ys.append(int(labels))
        elif len(labels) == len(all_ids):
            xs.append(acts)
            ys += [int(v) for v in labels[: len(ids)]]
        else:
            raise DataError(f"{path}:{n}: {len(labels)} labels for {len(all_ids)} tokens; give one per token")
    return torch.cat(xs), torch.tensor(ys)


# ---- probing ----------------------------------------------------------------------------------------------
def probe_task(sae: SAE, x: Tensor, y: Tensor, cfg: ProbingConfig, rng: random.Random) -> dict[str, Any] | None:
    """Accuracies of the dense and sparse probes on one task (None when a class has too few examples)."""
    pos = [i for i in range(len(y)) if y[i]]
    neg = [i for i in range(len(y)) if not y[i]]
    n = min(len(pos), len(neg), cfg.per_class)
    if n < 10:
        return None
    rows = rng.sample(pos, n) + rng.sample(neg, n)
    rng.shuffle(rows)
    n_test = max(2, round(len(rows) * cfg.test_fraction))
    test, train = torch.tensor(rows[:n_test]), torch.tensor(rows[n_test:])
    x, y = x.float(), y.float()
    z = sae.encode(x.to(sae.dtype)).float().detach()
    result: dict[str, Any] = {
        "examples": len(rows),
        "llm_test_accuracy": accuracy(fit_logistic(x[train], y[train]), x[test], y[test]),
        "sae_test_accuracy": accuracy(fit_logistic(z[train], y[train]), z[test], y[test]),
    }
    for k in cfg.ks:
        for name, acts in (("llm", x), ("sae", z)):
            ids, probe = k_sparse_probe(acts[train], y[train], k)
            result[f"{name}_top_{k}_test_accuracy"] = accuracy(probe, acts[test][:, ids], y[test])
    return result


@torch.no_grad()
def probing_data(model: HostModel, hook: str, cfg: ProbingConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """(activations, labels) per task at the hook: what every SAE at that hook is probed on."""
    data: dict[str, tuple[Tensor, Tensor]] = {}
    # code from held-out files; prose from all of it: the Python docs' held-out topics are ~1k tokens (the probes
    # are trained and tested on disjoint tokens either way)
    for specs, labeller, tasks, split in (
        (cfg.code, code_labels, CODE_TASKS, "eval"),
        (cfg.prose, prose_labels, PROSE_TASKS, "all"),
    ):
        if not specs:
            continue
        try:
            windows, labels = _labelled_windows(model, specs, labeller, cfg, split)
        except DataError:
            if not cfg.user_tasks:
                raise
            continue  # this model cannot read the built-in text (e.g. a toy tokenizer): the user's tasks still run
        acts = window_activations(model, hook, windows, cfg.batch_size)
        for task in tasks:
            keep = [(w, i) for w, lab in enumerate(labels) for i, v in enumerate(lab[task]) if v is not None]
            data[task] = (
                torch.stack([acts[w][i] for w, i in keep]),
                torch.tensor([labels[w][task][i] for w, i in keep]),
            )
    for path in cfg.user_tasks:
        data[Path(path).stem] = _user_task(model, hook, Path(path), cfg)
    return data


@torch.no_grad()
def probe_tasks(sae: SAE, data: dict[str, tuple[Tensor, Tensor]], cfg: ProbingConfig) -> dict[str, Any]:
    """Means over the tasks and per-task details for one SAE."""
    rng = random.Random(cfg.seed)
    details = {task: probe_task(sae, x, y, cfg, rng) for task, (x, y) in data.items()}
    scored = {task: d for task, d in details.items() if d is not None}
    if not scored:
        raise DataError("no probing task had enough positive and negative examples")
    keys = [k for k in next(iter(scored.values())) if k.endswith("accuracy")]
    means = {key: statistics.fmean(d[key] for d in scored.values()) for key in keys}
    return {
        **means,
        "tasks": len(scored),
        "skipped": sorted(set(details) - set(scored)),
        "details": scored,
        "config": asdict(cfg),
    }


def sparse_probing(
    sae: SAE, model: HostModel, cfg: ProbingConfig | None = None, hook: str | None = None
) -> dict[str, Any]:
    """Sparse probing of an SAE on the built-in tasks (and any user tasks): means over tasks, per-task details."""
    cfg = cfg or ProbingConfig()
    if sae.cfg.kind != "sae":
        raise ConfigError(f"sparse probing is for SAEs at one hook, not a {sae.cfg.kind}")
    hook = hook or sae.cfg.hook_name
    return probe_tasks(sae, probing_data(model, hook, cfg), cfg) | {"hook": hook}
