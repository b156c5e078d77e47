"""Row-wise top-k for CPU float32 through the small C kernel in topk.c (a heap per row, AVX2 compares).

torch.topk looks at every element with scalar work, a sizeable share of a TopK training step on CPU. The
kernel skips almost every element with one vector compare against the row's current k-th value
(docs/benchmarks.md times both). It is compiled
once with the system C compiler into the cache directory; without a compiler, AVX2, or on other devices
and dtypes, torch.topk is used (same values and indices up to the order within a row and ties).
NANOSAE_TORCH_TOPK=1 forces torch.topk.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from nanosae.io import atomic_write, cache_dir, sha256_file

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("topk.c")


def private_dir(root: Path) -> Path | None:
    """root/kernels-UID, created 0700; None when it is not this user's alone (then nothing there is loaded)."""
    d = root / f"kernels-{os.getuid()}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        log.warning("%s is not private to this user; the C top-k kernel is not loaded from it", d)
        return None
    return d


def build_kernel(lib: Path, compiler: str) -> None:
    """Compile topk.c into lib (atomically) and record its SHA-256 beside it."""
    cmd = lambda out: [compiler, "-O3", "-mavx2", "-fopenmp", "-shared", "-fPIC", str(_SOURCE), "-o", str(out)]
    atomic_write(lib, lambda tmp: subprocess.run(cmd(tmp), check=True, capture_output=True))
    lib.chmod(0o700)
    digest = sha256_file(lib)
    atomic_write(lib.with_suffix(".sha256"), lambda p: p.write_text(digest))  # replaces, never opens, what was there


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where torch.topk is used.

    A shared library runs code as soon as it is loaded, so it is only loaded from a directory that is this
    user's alone (kernels-UID, mode 0700) and only if its SHA-256 is the one recorded when it was built."""
    if os.environ.get("NANOSAE_TORCH_TOPK") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    try:
        directory = private_dir(cache_dir())
        if directory is None:
            return None
        lib = directory / f"topk-{hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]}.so"
        recorded = lib.with_suffix(".sha256")
        if not (lib.is_file() and recorded.is_file() and recorded.read_text(errors="replace")[:64] == sha256_file(lib)):
            if compiler is None:
                return None
            build_kernel(lib, compiler)
        handle = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        log.info("C top-k kernel unavailable (%s); using torch.topk", e)
        return None
    handle.topk_rows.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    handle.topk_rows.restype = None
    return handle


def topk_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries along the last dimension, in no particular order: the one
    top-k of nanosae (the C kernel for CPU float32 rows without gradients, torch.topk otherwise)."""
    usable = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.stride(1) == 1
        and 0 < k <= x.shape[1]
        and not x.requires_grad
    )
    lib = kernel() if usable else None  # not built at all when training on a GPU
    if lib is None:
        return x.topk(k, dim=-1, sorted=False)
    rows, cols = x.shape
    values = torch.empty(rows, k, dtype=x.dtype)
    indices = torch.empty(rows, k, dtype=torch.long)
    lib.topk_rows(
        x.data_ptr(), rows, cols, x.stride(0), k, torch.get_num_threads(), values.data_ptr(), indices.data_ptr()
    )
    return values, indices
