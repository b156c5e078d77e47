"""Files nanosae writes: atomically (a reader, or a crash, never sees half a file), with the user's umask,
under a lock while a process writes them; and where nanosae caches things."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nanosae.errors import NanosaeError


class LockedError(NanosaeError):
    """Another process is writing the same store, run directory or file."""


def _umask() -> int:
    """The process's umask: from /proc on Linux (reading it with os.umask means setting it, which races with
    threads creating files), else read once that way."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _umask_by_setting()


@functools.cache
def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (always 0600/0700) the mode a plain open/mkdir would have had."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp_path) on a temp file beside path, fsync it, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


JSON_LIMIT = 1 << 30  # bytes: a graph or an export batch is tens of MB; nothing nanosae writes comes near this


def regular_file(path: str | Path) -> Path:
    """path, if it is a regular file (following links); a FIFO, device or directory is refused before it is
    opened (opening a FIFO waits forever for a writer). A missing path passes: the caller reports it."""
    from nanosae.errors import FormatError

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    except OSError as e:
        raise FormatError(f"{path} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise FormatError(f"{path} is {what}, expected a regular file")
    return path


def is_number(text: str) -> bool:
    """Whether `text` is a plain decimal number int() reads: isdigit() alone also accepts '¹' and '٣'."""
    return text.isascii() and text.isdigit()


def parse_json(text: str | bytes, where: str | Path) -> Any:
    """JSON from text, or a one-line FormatError naming `where`: invalid JSON, nesting too deep for the parser
    (RecursionError) and integers longer than Python converts (ValueError) alike."""
    from nanosae.errors import FormatError, first_line

    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise FormatError(f"{where}: {first_line(e)}") from None


def read_json(path: str | Path, expect: type = dict) -> Any:
    """A JSON value of type `expect` (an object by default) from a file, or a one-line FormatError naming it:
    missing, not a regular file, over JSON_LIMIT, unreadable, not JSON, or another type."""
    from nanosae.errors import FormatError

    path = regular_file(path)
    try:
        if (size := path.stat().st_size) > JSON_LIMIT:
            raise FormatError(f"{path} is {size:,} bytes, more than a nanosae JSON file holds")
        value = parse_json(path.read_bytes(), path)
    except FileNotFoundError:
        raise FormatError(f"{path} is missing") from None
    except OSError as e:
        raise FormatError(f"{path} cannot be read: {e.strerror or e}") from None
    if not isinstance(value, expect):
        kind = "object" if expect is dict else "list" if expect is list else expect.__name__
        raise FormatError(f"{path}: expected a JSON {kind}, found {type(value).__name__}")
    return value


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(regular_file(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """$NANOSAE_CACHE, default ~/.cache/nanosae: the dequantized embedded model, the compiled top-k kernel."""
    return Path(os.environ.get("NANOSAE_CACHE") or Path.home() / ".cache" / "nanosae")


# ---- write locks ----------------------------------------------------------------------------------------
_held: dict[str, int] = {}  # lock file -> how many times this process holds it (locks are re-entrant)
_held_guard = threading.Lock()


def lock_path(target: str | Path, directory: bool = True) -> Path:
    """The lock file of a directory (DIR/.nanosae.lock) or of a file (.NAME.lock beside it)."""
    target = Path(target)
    return target / ".nanosae.lock" if directory else target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def write_lock(target: str | Path, directory: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on a directory (created if needed) or a file while writing it; a second writer gets
    a one-line LockedError naming the holder's pid. The lock is flock(2)-based: it dies with its process, so a killed
    run never leaves a stale lock, and the lock file is removed on release."""
    if directory and Path(target).exists() and not Path(target).is_dir():
        raise LockedError(f"{target} is a file; expected a directory to write into")
    path = lock_path(target, directory).resolve()
    key = str(path)
    with _held_guard:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # removed again if left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"{target} is being written by another nanosae process (pid {holder}); wait for it "
                f"to finish or write elsewhere (lock: {path})"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # the previous holder may have removed it meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        path.unlink(missing_ok=True)
        os.close(fd)
        for folder in made:  # a refused or failed job leaves no empty directory behind
            try:
                folder.rmdir()
            except OSError:
                break
