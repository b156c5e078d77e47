"""One write guard for every path a command writes to (docs/reliability.md, "Nothing it did not write").

A path is written only if it is new, empty, or holds this same kind of output written by nanosae; and never
inside another job's directory (a store, a run, an export), except the one the output is made from (`home`:
RUN/features.db, RUN/site/ belong to RUN). Directory outputs are built beside their target and swapped in, and
carry a marker listing their files, so replacing an earlier output removes only what that output wrote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from nanosae.errors import ConfigError
from nanosae.io import public_mode, write_lock

MARKER = ".nanosae-output"  # first line: the kind of output; then every file it wrote, one per line
LEGACY_MARKERS = {".nanosae-site": "viewer site"}  # written by earlier versions (a file list, no kind line)


def job_kind(directory: Path) -> str | None:
    """What nanosae job a directory holds (its own files say so), or None."""
    if (directory / MARKER).is_file():
        return _marker(directory)[0]
    for name, kind in LEGACY_MARKERS.items():
        if (directory / name).is_file():
            return kind
    manifest = directory / "manifest.json"
    if manifest.is_file() and (any(directory.glob("shard_*.npy")) or _says_store(manifest)):
        return "activation store"
    if (directory / "config.json").is_file() and any(
        (directory / p).exists() for p in ("sae", "checkpoints", "metrics.jsonl")
    ):
        return "training run"
    if (directory / "transcoders.json").is_file():
        return "transcoder set"
    return None


def _says_store(manifest: Path) -> bool:
    """A manifest.json naming nanosae's store format in its first bytes (a store holding no shard yet)."""
    try:
        with open(manifest, "rb") as f:
            return b'"nanosae-activations' in f.read(4096)
    except OSError:
        return False


def _marker(directory: Path) -> tuple[str, set[str]]:
    lines = (directory / MARKER).read_text(errors="replace").splitlines()
    return (lines[0] if lines else ""), set(lines[1:])


def _written_files(directory: Path) -> set[str]:
    for name in LEGACY_MARKERS:
        if (directory / name).is_file():
            return set((directory / name).read_text(errors="replace").splitlines())
    return _marker(directory)[1] if (directory / MARKER).is_file() else set()


def check_outside_jobs(path: Path, home: Path | None = None, allow: tuple[str, ...] = ()) -> None:
    """Refuse a path inside another job's directory (every folder above it is checked; `home`, and jobs of the
    kinds in `allow`, may hold it)."""
    home_real = home.resolve() if home is not None else None
    for parent in resolved(path).parents:
        if home_real is not None and parent == home_real:
            return
        kind = job_kind(parent) if parent.is_dir() else None
        if kind is not None and kind not in allow:
            raise ConfigError(f"{path} is inside {parent}, which holds a {kind}; write elsewhere, nothing was changed")


def resolved(path: str | Path) -> Path:
    """The real path (a symbolic link is followed once and written through, never replaced)."""
    return Path(os.path.realpath(path))


def check_job_dir(out: str | Path, kind: str, allow: tuple[str, ...] = (), flag: str = "--out") -> Path:
    """A directory a job continues or starts in (a store, a run): new, empty, or holding this kind of job (whose
    own identity check then decides), and not inside another kind of job than those in `allow`."""
    out = resolved(out)
    check_outside_jobs(out, allow=allow)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; expected a directory")
    held = job_kind(out) if out.is_dir() else None
    if held is not None and held != kind:
        raise ConfigError(f"{flag} {out} holds a {held}, not a {kind}; use another {flag}, nothing was changed")
    return out


def check_dir(out: str | Path, kind: str, home: Path | None = None, flag: str = "--out") -> Path:
    """The real path of a directory output, or a one-line refusal naming what it holds. It must be new, empty,
    or an earlier output of this kind whose every entry is listed in its marker."""
    out = resolved(out)
    check_outside_jobs(out, home)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; expected a new or empty directory")
    if not out.exists():
        return out
    # every entry but the folders that hold something: a file, a link or an empty folder may be a person's
    present = {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_symlink() or not p.is_dir() or not any(p.iterdir())
    }
    if not present:
        return out
    held = job_kind(out)
    if held is not None and held != kind:
        raise ConfigError(f"{flag} {out} holds a {held}; choose a new or empty directory, nothing was changed")
    written = _written_files(out)
    foreign = sorted(present - written - {MARKER, *LEGACY_MARKERS})
    if held is None or foreign:
        example = f" (e.g. {foreign[0]})" if foreign else ""
        raise ConfigError(
            f"{flag} {out} holds files nanosae did not write as a {kind}{example}; choose a new or "
            "empty directory, nothing was changed"
        )
    return out


@contextlib.contextmanager
def replacing_dir(out: str | Path, kind: str, home: Path | None = None, flag: str = "--out") -> Iterator[Path]:
    """Build a directory output: yields a temporary directory beside `out`; when the block ends, the marker is
    written and the directory swapped in for `out` (an earlier output of this kind is removed whole, and it held
    nothing else: check_dir). An error leaves `out` as it was."""
    out = resolved(out)
    with write_lock(out, directory=False):
        out = check_dir(out, kind, home, flag)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            public_mode(tmp, directory=True)
            yield tmp
            for p in [tmp, *tmp.rglob("*")]:  # copied files keep their source's mode: give each the user's umask
                if not p.is_symlink():
                    public_mode(p, directory=p.is_dir())
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.is_dir())
            (tmp / MARKER).write_text("".join(f + "\n" for f in [kind, *files]))
            if out.exists():
                old = tmp.with_suffix(".old")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check_file(
    out: str | Path, kind: str, is_ours: Callable[[Path], bool], home: Path | None = None, flag: str = "--out"
) -> Path:
    """The real path of a file output: new, or a regular file that `is_ours` recognises as this kind of output;
    never a directory, device, FIFO or a file inside another job's directory."""
    out = resolved(out)
    check_outside_jobs(out, home)
    if not out.exists():
        return out
    mode = out.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{flag} {out} is not a regular file; expected a new file or an earlier {kind}")
    if not is_ours(out):
        raise ConfigError(
            f"{flag} {out} exists and is not a {kind} nanosae wrote; choose another path, nothing was changed"
        )
    return out
