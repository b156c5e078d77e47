"""Every command × every file it reads × the ways a file goes wrong. Each case runs the real CLI in this process
on a copy of a workspace made by the CLI itself (a store, a run, features.db, eval.json, a cross-layer transcoder
set with a traced graph, a probing task, a corpus), with one file mutated, and asserts:
  - no traceback and no hang (60 s): exit 0, or exit 1 with exactly one `error:` line;
  - nothing the command does not write has changed (a refusal changes nothing at all).
The last test prints the count of cases by outcome (docs/reliability.md quotes it)."""

import json
import os
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import word_docs, write_corpus

OUTCOMES: Counter = Counter()
HOOK = "blocks.1.hook_resid_post"


def run(args: list, capsys, seconds: int = 60) -> tuple[str, int, str]:
    """(outcome, exit code, stderr): outcome is ok, error (one line), traceback or hang."""
    from nanosae.cli import main

    def timeout(*_):
        raise TimeoutError

    capsys.readouterr()
    old, sys.argv = sys.argv, ["nanosae", *map(str, args)]
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except TimeoutError:
        return "hang", -1, ""
    except BaseException as e:  # noqa: BLE001 — exactly what this suite counts
        return "traceback", -1, f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = old
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 0:
        return "ok", 0, err
    if code == 1 and len(lines) == 1 and lines[0].startswith("error: "):
        return "error", 1, err
    return "traceback", code, err


def snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_fifo():
            out[rel] = b"fifo"
        elif p.is_file():
            out[rel] = p.read_bytes()
        elif p.is_dir():
            out[rel + "/"] = b""
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama_dir):
    """What a user's disk holds after the whole path, made by the CLI."""
    root = tmp_path_factory.mktemp("workspace")
    write_corpus(root / "corpus.jsonl", word_docs(200))
    (root / "task.jsonl").write_text(
        "".join(json.dumps({"text": d, "labels": int("w7" in d.split())}) + "\n" for d in word_docs(40, seed=3))
    )
    model, data = str(tiny_llama_dir), str(root / "corpus.jsonl")
    steps = [
        [
            "collect",
            "--model",
            model,
            "--hook",
            HOOK,
            "--data",
            data,
            "--context-size",
            "16",
            "--tokens",
            "2k",
            "--tokens-per-shard",
            "512",
            "--out",
            root / "acts",
        ],
        [
            "train",
            "--acts",
            root / "acts" / HOOK,
            "--out",
            root / "run",
            "--d-sae",
            "32",
            "--k",
            "4",
            "--tokens",
            "3k",
            "--batch-size",
            "100",
            "--checkpoint-every",
            "10",
            "--ema-decay",
            "0.9",
        ],
        ["features", root / "run", "--data", data, "--context-size", "16", "--tokens", "400", "--top-n", "4"],
        ["eval", root / "run", "--data", data, "--context-size", "16", "--tokens", "100"],
        [
            "train",
            "--transcoders",
            "all",
            "--cross-layer",
            "--model",
            model,
            "--data",
            data,
            "--context-size",
            "16",
            "--d-sae",
            "16",
            "--k",
            "2",
            "--tokens",
            "1k",
            "--batch-size",
            "100",
            "--out",
            root / "set",
        ],
        ["trace", "w5 w6 w7", "--transcoders", root / "set", "--max-feature-nodes", "20"],
    ]
    from nanosae.cli import main

    for args in steps:
        old, sys.argv = sys.argv, ["nanosae", *map(str, args)]
        try:
            main()
        except SystemExit as e:
            assert not e.code, args
        finally:
            sys.argv = old
    return root


# ---- the files and what goes wrong with them ---------------------------------------------------------------
def _first(root: Path, pattern: str) -> str:
    return str(next(root.glob(pattern)).relative_to(root))


FILES = {  # name -> (path in the workspace, is JSON)
    "sae cfg.json": ("run/sae/cfg.json", True),
    "sae weights": ("run/sae/sae_weights.safetensors", False),
    "store manifest": (f"acts/{HOOK}/manifest.json", True),
    "store shard": (f"acts/{HOOK}/shard_00000.npy", False),
    "store ids": (f"acts/{HOOK}/ids_00000.npy", False),
    "run config.json": ("run/config.json", True),
    "metrics.jsonl": ("run/metrics.jsonl", False),
    "checkpoint state": ("run/checkpoints/step_30/state.pt", False),
    "features.db": ("run/features.db", False),
    "eval.json": ("run/eval.json", True),
    "transcoders.json": ("set/transcoders.json", True),
    "cross decoders": ("set/layer_0/cross_decoder.safetensors", False),
    "graph file": ("set/graphs/w5-w6-w7.json", True),
    "probing task": ("task.jsonl", False),
    "corpus": ("corpus.jsonl", False),
}


def mutate(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.unlink()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif how == "deep":
        path.write_bytes(b"[" * 100_000)
    elif how == "bigint":
        path.write_bytes(b'{"x": ' + b"9" * 5000 + b"}")
    elif how == "list":
        path.write_bytes(b"[]")
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "directory":
        path.mkdir()
    elif how == "devzero":
        path.symlink_to("/dev/zero")
    else:
        raise ValueError(how)


MUTATIONS = ["truncated", "empty", "garbage", "fifo", "directory", "devzero"]
JSON_MUTATIONS = ["deep", "bigint", "list"]


def commands(root: Path, out: Path) -> dict[str, tuple[list, list[str]]]:
    """name -> (args, what it may write, relative to root)."""
    model = ["--data", root / "corpus.jsonl", "--context-size", "16"]
    return {
        "info": (["info", root / "run"], []),
        "eval": (["eval", root / "run", *model, "--tokens", "64"], ["run/eval.json", "run/report.html"]),
        "eval full": (
            ["eval", root / "run", *model, "--tokens", "64", "--suite", "full", "--probing-task", root / "task.jsonl"],
            ["run/eval.json", "run/report.html", "run/saebench"],
        ),
        "features": (
            ["features", root / "run", *model, "--tokens", "200", "--top-n", "2"],
            ["run/features.db", "run/features.db.partial.pt"],
        ),
        "features --acts": (
            ["features", root / "run", "--acts", root / "acts" / HOOK, "--tokens", "200", "--top-n", "2"],
            ["run/features.db", "run/features.db.partial.pt", f"acts/{HOOK}/manifest.json"],
        ),
        "train --acts": (
            [
                "train",
                "--acts",
                root / "acts" / HOOK,
                "--out",
                out / "new",
                "--d-sae",
                "16",
                "--k",
                "2",
                "--tokens",
                "500",
                "--batch-size",
                "100",
            ],
            [f"acts/{HOOK}/manifest.json"],
        ),
        "train --resume": (
            [
                "train",
                "--acts",
                root / "acts" / HOOK,
                "--out",
                root / "run",
                "--d-sae",
                "32",
                "--k",
                "4",
                "--tokens",
                "3k",
                "--batch-size",
                "100",
                "--checkpoint-every",
                "10",
                "--ema-decay",
                "0.9",
                "--resume",
            ],
            ["run", f"acts/{HOOK}/manifest.json"],
        ),
        "collect": (
            [
                "collect",
                "--model",
                root / ".." / "model",
                "--hook",
                HOOK,
                "--tokens",
                "300",
                "--out",
                out / "acts",
                *model,
            ],
            [],
        ),
        "export saelens": (["export", "saelens", root / "run", "--out", out / "sl"], []),
        "export neuronpedia": (["export", "neuronpedia", root / "run", "--out", out / "np"], []),
        "view --export": (["view", root / "run", "--export", out / "site"], []),
        "explain": (["explain", root / "run"], ["run/features.db"]),
        "trace": (
            ["trace", "w5 w6", "--transcoders", root / "set", "--max-feature-nodes", "10"],
            ["set/graphs/w5-w6.json"],
        ),
        "intervene": (
            ["intervene", "w5 w6", "--transcoders", root / "set", "--set", "0_1_1=2", "--max-new-tokens", "2"],
            [],
        ),
        "view set --export": (["view", root / "set", "--export", out / "graphs"], []),
    }


READERS = {  # file -> the commands that read it
    "sae cfg.json": ["info", "eval", "features", "export saelens", "train --resume"],
    "sae weights": ["info", "eval", "export saelens", "features"],
    "store manifest": ["train --acts", "features --acts", "train --resume"],
    "store shard": ["train --acts", "features --acts"],
    "store ids": ["features --acts"],
    "run config.json": ["train --resume"],
    "metrics.jsonl": ["train --resume"],
    "checkpoint state": ["train --resume"],
    "features.db": ["view --export", "explain", "export neuronpedia", "export saelens", "eval full"],
    "eval.json": ["view --export"],
    "transcoders.json": ["trace", "intervene", "view set --export"],
    "cross decoders": ["trace", "intervene"],
    "graph file": ["view set --export", "intervene"],
    "probing task": ["eval full"],
    "corpus": ["features", "eval", "collect"],
}

CASES = [
    (f, how, cmd)
    for f, (path, is_json) in FILES.items()
    for how in MUTATIONS + (JSON_MUTATIONS if is_json else [])
    for cmd in READERS[f]
]


@pytest.mark.parametrize("file,how,command", CASES, ids=[f"{f}-{h}-{c}" for f, h, c in CASES])
def test_hostile_file(workspace, tiny_llama_dir, tmp_path, capsys, file, how, command):
    root = tmp_path / "ws"
    shutil.copytree(workspace, root, symlinks=True)
    (tmp_path / "model").symlink_to(tiny_llama_dir)
    out = tmp_path / "out"
    mutate(root / FILES[file][0], how)
    args, writes = commands(root, out)[command]
    before = snapshot(root)
    outcome, code, err = run(args, capsys)
    OUTCOMES[outcome] += 1
    assert outcome in ("ok", "error"), f"{outcome}: {err[-2000:]}"
    after = snapshot(root)
    allowed = lambda rel: any(rel == w or rel.startswith(w.rstrip("/") + "/") or rel.rstrip("/") == w for w in writes)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not allowed(k))
    if outcome == "error":
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    OUTCOMES["files changed that it did not write"] += bool(changed)
    assert not changed, f"{outcome}: changed {changed[:5]} ({err.strip()[:300]})"


def test_count_by_outcome():
    """Printed for the closing note and docs/reliability.md (run with -s to see it)."""
    if not OUTCOMES:
        pytest.skip("the matrix did not run in this session")
    print("\nhostile file matrix:", dict(OUTCOMES))
    assert OUTCOMES["traceback"] == OUTCOMES["hang"] == 0
