"""The C top-k kernel against torch.topk (same values and columns per row, up to order)."""

import os
import shutil

import pytest
import torch

from nanosae.sae import topk
from nanosae.sae.topk import topk_rows


def same_rows(x, k):
    v, i = topk_rows(x, k)
    rv, ri = x.topk(k, dim=-1, sorted=False)
    assert torch.equal(v.sort(-1).values, rv.sort(-1).values)
    assert torch.equal(i.sort(-1).values, ri.sort(-1).values)
    assert torch.equal(x.gather(1, i), v)


@pytest.mark.parametrize("cols,k", [(4608, 32), (1003, 7), (9, 9), (64, 1), (300, 150), (2304, 288), (77, 76)])
def test_equals_torch_topk(cols, k):
    torch.manual_seed(cols)
    same_rows(torch.randn(37, cols), k)


def test_strided_rows_inf_and_sorted_input():
    wide = torch.randn(50, 700)
    same_rows(wide[:, 3:603], 32)  # rows 700 apart in memory
    x = torch.randn(20, 400)
    x[:, ::3] = float("-inf")  # AuxK masks live latents this way
    same_rows(x, 16)
    same_rows(torch.arange(4000.0).repeat(3, 1), 32)  # increasing rows: every element replaces the minimum
    same_rows(-torch.arange(4000.0).repeat(3, 1), 32)


@pytest.mark.parametrize("k", [3, 150])  # the heap, and the quickselect used when k is a large share of the row
def test_ties_give_the_right_values_and_distinct_columns(k):
    x = torch.randint(0, 4, (25, 300)).float()  # many equal values: which of the tied columns is free
    v, i = topk_rows(x, k)
    assert torch.equal(v.sort(-1).values, x.topk(k, dim=-1).values.sort(-1).values)
    assert torch.equal(x.gather(1, i), v)
    assert all(len(set(row.tolist())) == k for row in i)


def test_kernel_is_used_where_it_can_be_built():
    on_x86_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("cc")
    assert (topk.kernel() is not None) == bool(on_x86_avx2)


def test_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(topk, "kernel", lambda: None)
    x = torch.randn(5, 100, dtype=torch.float64)
    v, i = topk_rows(x, 3)
    assert torch.equal(v, x.topk(3, dim=-1, sorted=False).values)


@pytest.fixture()
def fresh_kernel(tmp_path, monkeypatch):
    """The kernel built anew into an empty cache at tmp_path (the cached handle forgotten before and after)."""
    if topk.kernel() is None:
        pytest.skip("no C compiler / AVX2 here")
    monkeypatch.setenv("NANOSAE_CACHE", str(tmp_path))
    topk.kernel.cache_clear()
    try:
        assert topk.kernel() is not None
        yield tmp_path / f"kernels-{os.getuid()}"
    finally:
        topk.kernel.cache_clear()


def test_kernel_loads_only_from_a_private_dir_and_with_its_recorded_digest(fresh_kernel):
    """A library loaded by file name runs its constructor: a planted or altered .so must never be loaded."""
    built = next(fresh_kernel.glob("topk-*.so"))
    assert (built.parent.stat().st_mode & 0o777) == 0o700
    altered = built.with_name("altered")
    altered.write_bytes(built.read_bytes() + b"planted")
    os.replace(altered, built)  # altered after it was built (a new file: the loaded one stays mapped)
    topk.kernel.cache_clear()
    assert topk.kernel() is not None
    assert not built.read_bytes().endswith(b"planted")  # rebuilt, not loaded
    built.parent.chmod(0o777)  # a directory others can write into: nothing there is trusted
    topk.kernel.cache_clear()
    assert topk.kernel() is None


def test_a_fifo_as_the_kernels_digest_is_replaced_not_waited_on(fresh_kernel):
    digest = next(fresh_kernel.glob("topk-*.sha256"))
    digest.unlink()
    os.mkfifo(digest)
    topk.kernel.cache_clear()
    assert topk.kernel() is not None  # rebuilt; the digest is a file again
    assert digest.is_file() and len(digest.read_text()) == 64
