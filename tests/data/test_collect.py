import errno
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import nanosae
from nanosae import ActivationStore, CollectConfig, DataConfig, DataError, FormatError
from nanosae.data import ActivationStream, collect, iter_documents, token_batches

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


def config(word_corpus, out, **kw):
    data = DataConfig(specs=[str(word_corpus)], context_size=16, split="all")
    base = dict(
        model="tiny",
        hooks=HOOKS,
        data=data,
        tokens=700,
        out=str(out),
        batch_size=4,
        dtype="float32",
        tokens_per_shard=128,
    )
    return CollectConfig(**(base | kw))


def expected_activations(model, cfg):
    """run_with_cache on the same token windows, BOS positions dropped: the independent expectation
    (under "ids": each kept token's id and position, read off the windows)."""
    out = {h: [] for h in cfg.hooks + ["ids"]}
    for batch in token_batches(iter_documents(cfg.data), model.tokenizer, cfg.data.context_size, cfg.batch_size):
        _, cache = model.run_with_cache(batch.tokens, cfg.hooks)
        for h in cfg.hooks:
            out[h].append(cache[h][batch.valid])
        out["ids"] += [[int(batch.tokens[r, t]), t] for r, t in batch.valid.nonzero().tolist()]
    return {h: torch.cat(v)[: cfg.tokens] for h, v in out.items() if h != "ids"} | {"ids": out["ids"][: cfg.tokens]}


def test_store_equals_run_with_cache(tiny_model, word_corpus, tmp_path):
    cfg = config(word_corpus, tmp_path / "acts")
    stores = collect(cfg, model=tiny_model)
    expected = expected_activations(tiny_model, cfg)
    for hook in HOOKS:
        store = ActivationStore(tmp_path / "acts" / hook)
        assert len(store) == 700 and store.d_in == expected[hook].shape[1]
        assert [s["tokens"] for s in store.manifest["shards"]] == [128] * 5 + [60]
        assert torch.allclose(store.tokens(0, 700), expected[hook], atol=1e-5)
        m = store.manifest
        assert (m["hook"], m["dtype"], m["context_size"], m["complete"]) == (hook, "float32", 16, True)
        assert all(len(s["sha256"]) == 64 for s in m["shards"])
        assert store.token_ids(0, 700).tolist() == expected["ids"]
        assert store.token_ids(130, 260).tolist() == expected["ids"][130:260]  # across a shard boundary
    assert stores[HOOKS[1]].d_in == tiny_model.d_mlp


def test_float16_store(tiny_model, word_corpus, tmp_path):
    cfg = config(word_corpus, tmp_path / "acts", dtype="bfloat16", hooks=HOOKS[:1], tokens=300)
    collect(cfg, model=tiny_model)
    store = ActivationStore(tmp_path / "acts")  # a single hook dir is found from its parent
    ref = expected_activations(tiny_model, cfg)[HOOKS[0]]
    assert torch.equal(store.tokens(0, 300), ref.bfloat16().float())


KILLER = r"""
import os, signal, sys
import nanosae
from nanosae import CollectConfig, DataConfig
model = nanosae.load_model(sys.argv[1])
calls = []
def progress(p):
    calls.append(p)
    if p.tokens >= int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
data = DataConfig(specs=[sys.argv[2]], context_size=16, split="all")
nanosae.collect(CollectConfig(model="tiny", hooks=["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"], data=data,
                tokens=700, out=sys.argv[3], batch_size=4, dtype="float16", tokens_per_shard=128), model=model,
                progress=progress)
"""


@pytest.mark.parametrize("kill_at", [400, *random.Random(0).sample(range(200, 650), 2)])
def test_kill_and_resume_gives_identical_bytes(tiny_model, tiny_llama_dir, word_corpus, tmp_path, kill_at):
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tiny_llama_dir), str(word_corpus), str(killed), str(kill_at)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr  # it really died mid-way
    partial = ActivationStore(killed / HOOKS[0], verify=True)  # still a valid store
    assert 0 < len(partial) < 700 and not partial.manifest["complete"]
    collect(config(word_corpus, killed, dtype="float16"), model=tiny_model)  # same command resumes
    collect(config(word_corpus, tmp_path / "whole", dtype="float16"), model=tiny_model)
    for hook in HOOKS:
        a, b = sorted((killed / hook).glob("*_*.npy")), sorted((tmp_path / "whole" / hook).glob("*_*.npy"))
        assert [p.name for p in a] == [p.name for p in b]
        for x, y in zip(a, b):
            assert x.read_bytes() == y.read_bytes(), x.name
        assert len(ActivationStore(killed / hook)) == 700
        shards = sum(p.stat().st_size for p in (killed / hook).glob("shard_*.npy"))
        assert ActivationStore(killed / hook).manifest["bytes"] == shards  # hooks cut back to a common point too
    assert not list(killed.rglob("*.tmp"))


def test_resume_with_other_settings_is_refused(tiny_model, word_corpus, tmp_path):
    collect(config(word_corpus, tmp_path, hooks=HOOKS[:1], tokens=200), model=tiny_model)
    with pytest.raises(DataError, match="collected with context_size=16, this run asks for 32"):
        cfg = config(word_corpus, tmp_path, hooks=HOOKS[:1], tokens=200)
        cfg.data.context_size = 32
        collect(cfg, model=tiny_model)


def test_growing_a_complete_store(tiny_model, word_corpus, tmp_path):
    collect(config(word_corpus, tmp_path / "a", hooks=HOOKS[:1], tokens=300), model=tiny_model)
    collect(config(word_corpus, tmp_path / "a", hooks=HOOKS[:1], tokens=600), model=tiny_model)
    collect(config(word_corpus, tmp_path / "b", hooks=HOOKS[:1], tokens=600), model=tiny_model)
    a, b = ActivationStore(tmp_path / "a" / HOOKS[0]), ActivationStore(tmp_path / "b" / HOOKS[0])
    assert torch.equal(a.tokens(0, 600), b.tokens(0, 600))


def test_corrupted_shard_is_named(tiny_model, word_corpus, tmp_path):
    collect(config(word_corpus, tmp_path, hooks=HOOKS[:1], tokens=300), model=tiny_model)
    shard = tmp_path / HOOKS[0] / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="shard_00001.npy is corrupted"):
        ActivationStore(tmp_path / HOOKS[0])
    shard.write_bytes(bytes(data[:-5]) + bytes([data[-5] ^ 0xFF]) + bytes(data[-4:]))  # repaired
    ids = tmp_path / HOOKS[0] / "ids_00002.npy"
    ids.unlink()
    with pytest.raises(FormatError, match="ids_00002.npy is missing"):
        ActivationStore(tmp_path / HOOKS[0])


def test_shuffled_reader_visits_every_token_once_per_epoch(tiny_model, word_corpus, tmp_path):
    collect(config(word_corpus, tmp_path, hooks=HOOKS[:1], tokens=700), model=tiny_model)
    store = ActivationStore(tmp_path / HOOKS[0])
    everything = store.tokens(0, len(store))
    key = lambda t: sorted(map(tuple, t.tolist()))
    epochs = list(store.batches(64, shuffle=True, seed=3, epochs=2, pool_tokens=256))
    first = torch.cat(epochs[: len(epochs) // 2])
    second = torch.cat(epochs[len(epochs) // 2 :])
    assert key(first) == key(everything) and key(second) == key(everything)
    assert not torch.equal(first, everything) and not torch.equal(first, second)
    again = torch.cat(list(store.batches(64, shuffle=True, seed=3, epochs=2, pool_tokens=256)))
    assert torch.equal(again, torch.cat(epochs))
    assert torch.equal(torch.cat(list(store.batches(100, shuffle=False))), everything)
    # resuming at a batch index continues the same sequence
    tail = list(store.batches(64, shuffle=True, seed=3, epochs=2, pool_tokens=256, start_batch=5))
    assert all(torch.equal(a, b) for a, b in zip(tail, epochs[5:])) and len(tail) == len(epochs) - 5
    train_lo, train_hi = store.split_range("train")
    assert (train_lo, train_hi, store.split_range("eval")) == (0, 665, (665, 700))


def test_norm_scale(tiny_model, word_corpus, tmp_path):
    collect(config(word_corpus, tmp_path, hooks=HOOKS[:1], tokens=300), model=tiny_model)
    store = ActivationStore(tmp_path / HOOKS[0])
    scaled = torch.cat(list(store.batches(100, shuffle=False, scale=True)))
    assert abs(float(scaled.pow(2).sum(-1).mean()) - store.d_in) < 1e-3 * store.d_in
    assert json.loads((store.path / "manifest.json").read_text())["norm_scale"] == pytest.approx(store.norm_scale())
    store.check(d_in=store.d_in)
    with pytest.raises(DataError, match="store has d_in=32, expected 64"):
        store.check(d_in=64)
    with pytest.raises(DataError, match="collected from"):
        store.check(model="other")


def test_nan_activations_stop_with_error(tiny_model, word_corpus, tmp_path):
    with tiny_model.hooks({HOOKS[0]: lambda x: x * float("nan")}):
        with pytest.raises(DataError, match="NaN or inf activations at blocks.0.hook_resid_post"):
            collect(config(word_corpus, tmp_path, hooks=HOOKS[:1], tokens=300), model=tiny_model)


def test_disk_full_keeps_store_valid(tiny_model, word_corpus, tmp_path, monkeypatch):
    import nanosae.data.store as store_mod

    real, calls = store_mod.write_file, []

    def flaky(path, write):
        calls.append(path)
        if len(calls) == 6:  # ids_00000, shard_00000, ids_00001, shard_00001, ids_00002, shard_00002

            def write(tmp, real_write=write):
                real_write(tmp)  # half the work is done on disk, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, write)

    monkeypatch.setattr(store_mod, "write_file", flaky)
    with pytest.raises(DataError, match="shard_00002.npy: could not be written \\(disk full\\)"):
        collect(config(word_corpus, tmp_path, hooks=HOOKS[:1], tokens=700), model=tiny_model)
    store = ActivationStore(tmp_path / HOOKS[0])
    assert len(store) == 256 and not store.manifest["complete"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(store.token_ids(0, 256)) == 256


def test_empty_corpus(tiny_model, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    cfg = CollectConfig(
        model="tiny",
        hooks=HOOKS[:1],
        data=DataConfig(specs=[str(tmp_path / "empty.txt")], split="all"),
        tokens=100,
        out=str(tmp_path / "out"),
    )
    with pytest.raises(DataError, match="gave no tokens"):
        collect(cfg, model=tiny_model)


def test_unknown_hook(tiny_model, word_corpus, tmp_path):
    with pytest.raises(nanosae.HookError, match="unknown hook name"):
        collect(config(word_corpus, tmp_path, hooks=["blocks.0.resid"]), model=tiny_model)


def test_stream_yields_the_same_activations(tiny_model, word_corpus, tmp_path):
    cfg = config(word_corpus, tmp_path, hooks=HOOKS[:1], tokens=10**6)
    collect(cfg, model=tiny_model)  # the whole corpus
    everything = ActivationStore(tmp_path / HOOKS[0]).tokens(0, 10**6)
    stream = ActivationStream(tiny_model, HOOKS[0], cfg.data, model_batch_size=4, buffer_tokens=300)
    got = torch.cat(list(stream.batches(64, seed=1)))
    assert got.shape == everything.shape
    assert torch.allclose(torch.sort(got.sum(-1)).values, torch.sort(everything.sum(-1)).values, atol=1e-4)
    assert not torch.allclose(got, everything)


def test_damaged_complete_store_is_repaired_by_the_same_command(tiny_model, word_corpus, tmp_path):
    """A deleted shard and a corrupted one: rerunning collect recollects from the first damaged shard, and the
    store ends byte-identical to an undamaged collection."""
    cfg = config(word_corpus, tmp_path / "acts", hooks=HOOKS[:1], tokens=600)
    collect(cfg, model=tiny_model)
    store_dir = tmp_path / "acts" / HOOKS[0]
    reference = {p.name: p.read_bytes() for p in store_dir.glob("*.npy")}
    (store_dir / "shard_00003.npy").unlink()
    ids = store_dir / "ids_00001.npy"
    ids.write_bytes(ids.read_bytes()[:-3] + b"\xff\xff\xff")
    with pytest.raises(FormatError, match="ids_00001.npy is corrupted"):
        ActivationStore(store_dir)
    collect(cfg, model=tiny_model)
    assert {p.name: p.read_bytes() for p in store_dir.glob("*.npy")} == reference
    assert len(ActivationStore(store_dir)) == 600


def test_second_writer_is_refused_while_the_first_holds_the_store(tiny_model, word_corpus, tmp_path):
    from nanosae.io import write_lock

    cfg = config(word_corpus, tmp_path / "acts", hooks=HOOKS[:1], tokens=300)
    stale = tmp_path / "acts" / HOOKS[0] / ".shard_00000.npy.abc.tmp"  # the first writer's file in flight
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"in flight")
    with write_lock(tmp_path / "acts" / HOOKS[0]):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                f"""
import sys
from nanosae.io import write_lock
try:
    with write_lock({str(tmp_path / "acts" / HOOKS[0])!r}):
        sys.exit(0)
except Exception as e:
    print(e)
    sys.exit(3)
""",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 3 and f"pid {os.getpid()}" in proc.stdout, proc.stdout + proc.stderr
    assert stale.exists()  # the refused writer removed nothing
    stale.unlink()
    collect(cfg, model=tiny_model)  # the lock died with its holder: the next writer goes ahead
    assert not (tmp_path / "acts" / HOOKS[0] / ".nanosae.lock").exists()


def store_with_manifest(tmp_path, edit, dtype="float32"):
    from nanosae.data import write_store

    write_store(tmp_path / "s", torch.randn(300, 8), dtype=dtype, tokens_per_shard=100)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "s"


@pytest.mark.parametrize("name", ["/dev/zero", "../outside.npy", "/etc/passwd", "shard_00000.npy/../../x.npy", 7])
def test_manifest_cannot_name_files_outside_the_store(tmp_path, name):
    (tmp_path / "outside.npy").write_bytes(b"")
    path = store_with_manifest(tmp_path, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(FormatError, match="shard 0 must name files"):
        ActivationStore(path, verify=False)


def test_manifest_dtype_must_match_the_shards(tmp_path):
    path = store_with_manifest(tmp_path, lambda m: m.update(dtype="bfloat16"), dtype="float16")
    with pytest.raises(FormatError, match="holds float16 values but the manifest says bfloat16"):
        ActivationStore(path)  # the checksums still match: only the element type gives it away


def test_write_store_from_blocks_equals_one_tensor(tmp_path):
    """A store larger than memory is written block by block; the result equals writing the whole tensor."""
    x = torch.randn(1000, 8)
    whole = nanosae.data.write_store(tmp_path / "whole", x, dtype="float16", tokens_per_shard=128)
    parts = nanosae.data.write_store(
        tmp_path / "parts", (x[i : i + 70] for i in range(0, 1000, 70)), dtype="float16", tokens_per_shard=128
    )
    assert len(parts) == 1000 and parts.manifest["complete"]
    assert [s["sha256"] for s in parts.manifest["shards"]] == [s["sha256"] for s in whole.manifest["shards"]]
    assert torch.equal(parts.tokens(0, 1000), x.half().float())
    with pytest.raises(DataError, match="expected d_in=8"):
        nanosae.data.write_store(tmp_path / "bad", iter([x, torch.randn(5, 9)]))


def test_hooks_a_shard_apart_resume_from_their_common_point_with_true_byte_counts(tiny_model, word_corpus, tmp_path):
    """One hook's store a shard ahead of the other's (a kill between their writes): both continue from the common
    point, and each manifest's byte count is that of its shards, not the dropped shard's too."""
    import json

    collect(config(word_corpus, tmp_path, tokens=512), model=tiny_model)
    behind = tmp_path / HOOKS[0] / "manifest.json"
    m = json.loads(behind.read_text())
    m["shards"], m["complete"] = m["shards"][:-1], False
    m["tokens"], m["bytes"] = 384, m["bytes"] - (tmp_path / HOOKS[0] / "shard_00003.npy").stat().st_size
    behind.write_text(json.dumps(m))
    collect(config(word_corpus, tmp_path, tokens=640), model=tiny_model)
    for hook in HOOKS:
        store = ActivationStore(tmp_path / hook)
        assert len(store) == 640
        assert store.manifest["bytes"] == sum(p.stat().st_size for p in (tmp_path / hook).glob("shard_*.npy")), hook
