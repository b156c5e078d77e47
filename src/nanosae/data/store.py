"""The on-disk activation store: fixed-size .npy shards + manifest.json, one directory per hook.

Beside each shard, `ids_NNNNN.npy` holds (token id, position in its window) per activation as int32, so
the feature database can be built from a store without running the model again.

Shards are written whole and atomically (temp file + rename) by a background thread, each followed
by a manifest rewrite (also atomic) that lists it with its SHA-256. A crash therefore leaves a store
that is valid up to its last complete shard, which is where a resumed collection continues.
bfloat16 has no numpy dtype, so it is stored as uint16 bits and viewed back on reading.
"""

from __future__ import annotations

import errno
import hashlib
import math
import mmap
import queue
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nanosae.config import STORE_DTYPES, DataConfig
from nanosae.errors import DataError, FormatError, NanosaeError, first_line
from nanosae.io import atomic_write as write_file
from nanosae.io import read_json, regular_file, sha256_file, write_json, write_lock

MANIFEST = "manifest.json"
FORMAT = "nanosae-activations/1"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def ids_name(index: int) -> str:
    return f"ids_{index:05d}.npy"


def _to_numpy(x: Tensor, dtype: str) -> np.ndarray:
    x = x.detach().to("cpu", STORE_DTYPES[dtype]).contiguous()
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def _from_numpy(a: np.ndarray, dtype: str) -> Tensor:
    t = torch.from_numpy(np.array(a))  # a copy: shards are read-only memory maps
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class _HashingFile:
    """File wrapper that hashes what is written, so a shard is never held twice in memory."""

    def __init__(self, f: Any):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.n += len(memoryview(data).cast("B"))
        return self.f.write(data)


def save_npy(path: Path, array: np.ndarray) -> tuple[str, tuple[int, int]]:
    """np.save straight into an atomically renamed file; returns (sha256, (rows, bytes))."""
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            hf = _HashingFile(f)
            np.save(hf, array)
            result["sha"], result["n"] = hf.sha.hexdigest(), hf.n

    write_file(path, write)
    return result["sha"], (int(array.shape[0]), result["n"])


_SHARD_FILE = re.compile(r"(shard|ids)_\d{5}\.npy")
_NPY_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, checked: known format and dtype, a positive d_in, and shard entries that name files of
    this store only (shard_NNNNN.npy / ids_NNNNN.npy: no path can lead outside it) with token counts and
    SHA-256 digests."""
    path = directory / MANIFEST
    if not path.exists():
        raise FormatError(f"{path} is missing: not an activation store (create one with `nanosae collect`)")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise FormatError(f"{path}: unknown store format {manifest.get('format')!r} (expected {FORMAT})")
    if not isinstance(manifest.get("dtype"), str) or manifest["dtype"] not in STORE_DTYPES:
        raise FormatError(f"{path}: dtype {manifest.get('dtype')!r} is not one of {', '.join(STORE_DTYPES)}")
    for key in ("d_in", "tokens_per_shard"):
        if not _positive_int(manifest.get(key)):
            raise FormatError(f"{path}: {key} must be a positive integer, got {manifest.get(key)!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise FormatError(f"{path}: 'shards' must be a list, got {type(shards).__name__}")
    for i, s in enumerate(shards):
        names = (
            [s.get("file"), *([s["ids"]] if isinstance(s, dict) and "ids" in s else [])] if isinstance(s, dict) else []
        )
        if not names or not all(isinstance(n, str) and _SHARD_FILE.fullmatch(n) for n in names):
            raise FormatError(
                f"{path}: shard {i} must name files shard_NNNNN.npy / ids_NNNNN.npy inside the store, got {s!r:.120}"
            )
        if not (
            _positive_int(s.get("tokens"))
            and isinstance(s.get("sha256"), str)
            and ("ids" not in s or isinstance(s.get("ids_sha256"), str))
        ):
            raise FormatError(f"{path}: shard {i} needs a positive 'tokens' count and SHA-256 digests, got {s!r:.120}")
    _check_optional_fields(manifest, path)
    return manifest


def _check_optional_fields(manifest: dict[str, Any], path: Path) -> None:
    """The fields readers use besides the shards (collect writes them all; a store from write_store may leave
    them empty): each of its type, or absent/null."""
    kinds: dict[str, Any] = {
        "hook": str,
        "model": str,
        "model_dtype": str,
        "context_size": int,
        "bos_id": int,
        "tokens": int,
        "bytes": int,
        "batch_size": int,
        "target_tokens": int,
        "complete": bool,
        "data": dict,
        "norm_scale": (int, float),
    }
    for key, kind in kinds.items():
        value = manifest.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"{path}: {key} must be {getattr(kind, '__name__', 'a number')}, got {str(value)[:40]!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (value < 0 or not math.isfinite(value)):
            raise FormatError(f"{path}: {key} must be a non-negative finite number, got {value!r}")
    if manifest.get("norm_scale") == 0:
        raise FormatError(f"{path}: norm_scale must be positive")
    data = manifest.get("data")
    if data is not None:
        try:
            DataConfig.from_dict(data)
        except (NanosaeError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: data: {first_line(e)}") from None


def load_npy(file: Path) -> np.ndarray:
    """A store file memory-mapped, or a one-line FormatError naming it (missing, not a regular file, empty,
    truncated, not .npy)."""
    try:
        return np.load(regular_file(file), mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FormatError(f"{file} is missing from the store (rerun the collect command to repair it)") from None
    except (ValueError, OSError, EOFError) as e:
        raise FormatError(f"{file} is not a readable .npy file: {first_line(e)}") from None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def shard_problem(directory: Path, entry: dict[str, Any]) -> str | None:
    """Why a listed shard (or its token ids) cannot be used, or None when its files match their SHA-256."""
    files = [(entry["file"], entry["sha256"])] + ([(entry["ids"], entry["ids_sha256"])] if "ids" in entry else [])
    for name, sha in files:
        file = directory / name
        if not file.is_file():
            return f"{file} is missing from the store"
        if sha256_file(file) != sha:
            return f"{file} is corrupted (SHA-256 does not match the manifest)"
    return None


def norm_scale(x: Tensor, where: str | Path) -> float:
    """sqrt(width / mean squared norm): the factor that gives activations x (n, width) a mean squared norm
    equal to their width, as SAELens's and sparsify's activation normalisation do. `where` (the store, or the
    model's activations) names them when they are all zero."""
    mean_sq = float(x.pow(2).sum(-1).mean())
    if not mean_sq > 0:
        raise DataError(f"{where}: the activations are all zero: nothing to train on (was the hook point right?)")
    return math.sqrt(x.shape[-1] / mean_sq)


class ShardWriter:
    """Accumulates activations for one hook and writes full shards from a background thread.
    The caller holds the directory's write lock (io.write_lock), so the stale temp files removed here are
    a killed run's, never another writer's."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.dir = directory
        self.manifest = manifest
        for stale in directory.glob(".*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        self.size = int(manifest["tokens_per_shard"])
        self.pending: list[Tensor] = []
        self.pending_ids: list[Tensor] = []
        self.pending_tokens = 0
        self.queue: queue.Queue = queue.Queue(maxsize=1)  # bounds memory: at most one shard waiting
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True, name=f"nanosae-writer-{directory.name}")
        self.thread.start()

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.manifest["shards"])

    def add(self, acts: Tensor, ids: Tensor | None = None) -> None:
        """Append activations (n, d_in) and, optionally, their (token id, position) pairs (n, 2)."""
        self._raise()
        if ids is not None and ids.shape != (acts.shape[0], 2):
            raise DataError(f"token ids have shape {tuple(ids.shape)}, expected ({acts.shape[0]}, 2)")
        if (ids is None) != (not self.pending_ids) and self.pending:
            raise DataError("a store gets token ids with every activation or with none")
        self.pending.append(acts.to(STORE_DTYPES[self.manifest["dtype"]]))
        if ids is not None:
            self.pending_ids.append(ids.to("cpu", torch.int32))
        self.pending_tokens += acts.shape[0]
        while self.pending_tokens >= self.size:
            block = torch.cat(self.pending)
            id_block = torch.cat(self.pending_ids) if self.pending_ids else None
            self._put(block[: self.size], None if id_block is None else id_block[: self.size])
            rest = block[self.size :]
            self.pending, self.pending_tokens = ([rest] if len(rest) else []), len(rest)
            self.pending_ids = [id_block[self.size :]] if id_block is not None and len(rest) else []

    def close(self, complete: bool) -> None:
        """Flush the last partial shard (when complete), wait for the writer, write the final manifest."""
        if complete and self.pending_tokens:
            self._put(torch.cat(self.pending), torch.cat(self.pending_ids) if self.pending_ids else None)
        self.pending, self.pending_ids, self.pending_tokens = [], [], 0
        self.queue.put(None)
        self.thread.join()
        self._raise()
        self.manifest["complete"] = complete
        write_json(self.dir / MANIFEST, self.manifest)

    def _put(self, shard: Tensor, ids: Tensor | None) -> None:
        while True:
            self._raise()
            try:
                self.queue.put((shard, ids), timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            shard, ids = item
            index = len(self.manifest["shards"])
            name = shard_name(index)
            try:
                entry: dict[str, Any] = {}
                if ids is not None:  # written first: a shard listed in the manifest always has its ids
                    name = ids_name(index)
                    entry = {"ids": name, "ids_sha256": save_npy(self.dir / name, ids.numpy())[0]}
                    name = shard_name(index)
                digest, size = save_npy(self.dir / name, _to_numpy(shard, self.manifest["dtype"]))
                del shard, item
                self.manifest["shards"].append({"file": name, "tokens": size[0], "sha256": digest, **entry})
                self.manifest["tokens"] = self.tokens
                self.manifest["bytes"] = self.manifest.get("bytes", 0) + size[1]
                write_json(self.dir / MANIFEST, self.manifest)
            except OSError as e:
                if len(self.manifest["shards"]) > index:
                    self.manifest["shards"].pop()
                    self.manifest["tokens"] = self.tokens
                why = "disk full" if e.errno == errno.ENOSPC else str(e)
                self.error = DataError(
                    f"{self.dir / name}: could not be written ({why}); the store is valid up to "
                    f"{self.tokens} tokens and the same command resumes from there"
                )


def write_store(
    directory: str | Path,
    acts: Tensor | Iterable[Tensor],
    *,
    hook: str = "",
    model: str = "",
    dtype: str = "float32",
    tokens_per_shard: int = 32768,
    context_size: int = 0,
    ids: Tensor | None = None,
) -> ActivationStore:
    """Write activations you already have as a store, e.g. synthetic data or another tool's cache: one (N, d_in)
    tensor, or blocks of them from an iterable (a store larger than memory); ids: optional (N, 2) token id and
    position in its window of each activation (with a single tensor)."""
    directory = Path(directory)
    blocks = iter([acts] if isinstance(acts, Tensor) else acts)
    first = next(blocks, None)
    if first is None:
        raise DataError(f"{directory}: no activations to write")
    directory.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model": model,
        "hook": hook,
        "d_in": int(first.shape[1]),
        "dtype": dtype,
        "context_size": context_size,
        "tokens_per_shard": tokens_per_shard,
        "batch_size": 0,
        "data": None,
        "target_tokens": int(first.shape[0]),
        "tokens": 0,
        "bytes": 0,
        "complete": False,
        "shards": [],
        "norm_scale": None,
    }
    if (directory / MANIFEST).exists():
        raise DataError(f"{directory} already holds an activation store; write the new one elsewhere")
    with write_lock(directory):
        writer = ShardWriter(directory, manifest)
        writer.add(first, ids)
        for block in blocks:
            if block.shape[1:] != first.shape[1:]:
                raise DataError(f"{directory}: a block has width {block.shape[1]}, expected d_in={first.shape[1]}")
            manifest["target_tokens"] += int(block.shape[0])
            writer.add(block)
        writer.close(complete=True)
    return ActivationStore(directory, verify=False)


def release_pages(shard: np.ndarray) -> None:
    """Unmap a memory-mapped shard's pages from this process once read (they stay in the page cache): otherwise
    every shuffle pool copied out of the shards stays resident twice, once as the pool and once as file pages."""
    mapped = getattr(shard, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


class ActivationStore:
    """Read a store: len(store) tokens of width store.d_in, mini-batches in a seeded shuffled order."""

    def __init__(self, path: str | Path, verify: bool = True):
        path = Path(path)
        if not (path / MANIFEST).exists() and path.is_dir():
            subdirs = [p for p in path.iterdir() if (p / MANIFEST).exists()]
            if len(subdirs) == 1:
                path = subdirs[0]
            elif len(subdirs) > 1:
                names = ", ".join(sorted(p.name for p in subdirs))
                raise FormatError(f"{path} holds several stores ({names}); open one of them")
        self.path = path
        self.manifest = read_manifest(path)
        self.dtype = self.manifest["dtype"]
        if verify:
            self.verify()
        self.shards = [self._open_shard(s) for s in self.manifest["shards"]]
        self.offsets = np.cumsum([0] + [s["tokens"] for s in self.manifest["shards"]])

    def _open_shard(self, entry: dict[str, Any]) -> np.ndarray:
        """Memory-map one shard, checking its shape and element type against the manifest."""
        file = self.path / entry["file"]
        a = load_npy(file)
        if a.shape != (entry["tokens"], self.d_in):
            raise FormatError(f"{file}: shape {a.shape}, manifest says ({entry['tokens']}, {self.d_in})")
        if a.dtype != _NPY_DTYPES[self.dtype]:
            raise FormatError(f"{file}: holds {a.dtype} values but the manifest says {self.dtype}")
        return a

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def hook(self) -> str:
        return self.manifest["hook"]

    def verify(self) -> None:
        """Check every shard (and token-id file) against its SHA-256; a corrupted or missing file is named."""
        for entry in self.manifest["shards"]:
            problem = shard_problem(self.path, entry)
            if problem:
                raise FormatError(f"{problem} (rerun the collect command that made the store to repair it)")

    @property
    def has_ids(self) -> bool:
        return bool(self.manifest["shards"]) and all("ids" in s for s in self.manifest["shards"])

    def token_ids(self, start: int, stop: int) -> Tensor:
        """(token id, position in its window) of activations [start, stop) as an (n, 2) long tensor."""
        if not self.has_ids:
            raise FormatError(
                f"{self.path} has no token ids (written by write_store without ids, or by an older "
                "nanosae); collect it again, or build features from the model"
            )
        parts = []
        for i, s in enumerate(self.manifest["shards"]):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= stop:
                break
            if hi > start:
                file = self.path / s["ids"]
                a = load_npy(file)
                if a.shape != (s["tokens"], 2) or a.dtype.kind not in "iu":
                    raise FormatError(
                        f"{file}: {a.dtype} of shape {a.shape}, manifest says integers of ({s['tokens']}, 2)"
                    )
                parts.append(torch.from_numpy(np.array(a[max(start, lo) - lo : min(stop, hi) - lo])).long())
        return torch.cat(parts) if parts else torch.empty(0, 2, dtype=torch.long)

    def check(self, d_in: int | None = None, model: str | None = None) -> None:
        """Errors when the store was made from another model or has another width than asked."""
        if d_in is not None and d_in != self.d_in:
            raise DataError(f"{self.path}: store has d_in={self.d_in}, expected {d_in}")
        if model is not None and model != self.manifest["model"]:
            raise DataError(f"{self.path}: store was collected from {self.manifest['model']!r}, not {model!r}")

    # ---- reading ----------------------------------------------------------------------------
    def tokens(self, start: int, stop: int) -> Tensor:
        """Activations [start, stop) as a float32 tensor (copies only that range)."""
        return self.read(start, stop).float()

    def read(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Activations [start, stop) in the store's own dtype, into `out` when given (no other copy)."""
        stop = min(stop, len(self))
        out = torch.empty(max(0, stop - start), self.d_in, dtype=STORE_DTYPES[self.dtype]) if out is None else out
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.shards)):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            if b > a:
                out[lo + a - start : lo + b - start] = _from_numpy(self.shards[i][a:b], self.dtype)
                release_pages(self.shards[i])
        return out

    def split_range(self, split: str, eval_fraction: float = 0.05) -> tuple[int, int]:
        """Token range of a split: 'train' is the first 95%, 'eval' the last 5%, 'all' everything."""
        n = len(self)
        cut = n - int(round(n * eval_fraction))
        return {"all": (0, n), "train": (0, cut), "eval": (cut, n)}[split]

    def norm_scale(self, n_tokens: int = 20_000) -> float:
        """Factor that makes the mean squared norm of (scaled) activations equal d_in; stored in the manifest."""
        if self.manifest.get("norm_scale"):
            return float(self.manifest["norm_scale"])
        n = len(self)
        if n == 0:
            raise DataError(f"{self.path}: the store is empty")
        idx = np.linspace(0, n - 1, num=min(n, n_tokens)).astype(np.int64)
        sample = torch.stack([self.tokens(int(i), int(i) + 1)[0] for i in idx])
        if not torch.isfinite(sample).all():
            raise DataError(f"{self.path}: the store holds NaN or inf activations")
        self.manifest["norm_scale"] = scale = norm_scale(sample, self.path)
        try:
            write_json(self.path / MANIFEST, self.manifest)
        except OSError:
            pass  # a read-only store still works; the factor is recomputed next time
        return scale

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int = 1,
        split: str = "all",
        scale: bool = False,
        pool_tokens: int | None = None,
        start_batch: int = 0,
    ) -> Iterator[Tensor]:
        """(batch_size, d_in) float32 batches; every token of the split once per epoch.

        Shuffling draws a seeded permutation of chunks (1/16 of a pool, at most a shard), reads `pool_tokens`
        of them at a time (default: 128k tokens, or 512 MB as float32 if that is more) and permutes tokens within
        that pool, so memory stays bounded while every pool mixes text from all over the store. The pool is held
        in the store's dtype and each batch is gathered from it and converted on its way out, so a pool costs
        its size on disk once (at d_in 2304: 600 MB of float16, not 1.2 GB of float32 copied twice).
        start_batch skips batches (for exact resume). The last batch of each epoch may be smaller.
        """
        lo, hi = self.split_range(split)
        factor = self.norm_scale() if scale else 1.0
        pool_tokens = pool_tokens or max(131072, 2**29 // (4 * self.d_in))
        chunk = max(1, min(int(self.manifest["tokens_per_shard"]), max(1024, pool_tokens // 16), pool_tokens))
        emitted = 0
        for epoch in range(epochs):
            rng = np.random.default_rng([seed, epoch])
            chunks = [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]
            if shuffle:
                chunks = [chunks[i] for i in rng.permutation(len(chunks))]
            carry = torch.empty(0, self.d_in, dtype=STORE_DTYPES[self.dtype])
            group = max(1, pool_tokens // chunk)
            out = lambda t: t.float() * factor if scale else t.float()
            for g in range(0, len(chunks), group):
                part = chunks[g : g + group]
                pool = torch.empty(len(carry) + sum(b - a for a, b in part), self.d_in, dtype=carry.dtype)
                pool[: len(carry)] = carry
                at = len(carry)
                for a, b in part:
                    self.read(a, b, out=pool[at : at + b - a])
                    at += b - a
                order = torch.from_numpy(rng.permutation(len(pool))) if shuffle else torch.arange(len(pool))
                n_full = len(pool) // batch_size * batch_size
                for i in range(0, n_full, batch_size):
                    if emitted >= start_batch:
                        yield out(pool[order[i : i + batch_size]])
                    emitted += 1
                carry = pool[order[n_full:]]
                del pool  # before the next pool is read: one pool in memory at a time
            if len(carry):
                if emitted >= start_batch:
                    yield out(carry)
                emitted += 1


def check_same_tokens(others: list[ActivationStore], first: ActivationStore) -> None:
    """Stores of other models trained with `first` (a diff) hold the same token windows: their token ids agree
    (a DataError naming the store otherwise)."""
    if not others:
        return
    ids = first.token_ids(0, len(first)) if first.has_ids else None
    for store in others:
        if ids is None or not store.has_ids:
            raise DataError(f"{store.path}: stores of two models need token ids to be paired (collect them again)")
        if not torch.equal(store.token_ids(0, len(store)), ids):
            raise DataError(
                f"{store.path} and {first.path} hold other token windows; collect both models in one run "
                "(nanosae collect --model A --model B)"
            )
