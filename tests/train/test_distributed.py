"""Training over several processes (gloo, CPU). Latents sharded over processes: the same losses, gradients and
weights as one process, exact resume from sharded checkpoints, sharding combined with data parallelism. SAEs
spread over processes: each trained as one process trains it."""

import json
import os
import subprocess
import sys

import pytest
import torch

import nanosae
from nanosae import SAE, TrainConfig
from nanosae.errors import ConfigError

SETTINGS = dict(
    d_sae=128,
    k=4,
    batch_size=512,
    tokens=512 * 20,
    log_every=1,
    checkpoint_every=5,
    lr=3e-3,
    ema_decay=0.9,
    dead_tokens=512,
)  # 128 latents for 64 planted features, dead after one silent batch: AuxK runs

SCRIPT = r"""
import json, logging, os, signal, sys, torch, torch.distributed as dist
logging.basicConfig(level=logging.INFO)
import nanosae
from nanosae import SAE, SAEConfig, TrainConfig
settings, kill_at, grads_to = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if grads_to:  # one step's loss and gradients, sharded over the processes, gathered on rank 0
    from nanosae.train.sharded import gather_full, local_slice, make_shards, reduce_gradients, sharded_loss
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    full = SAE(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=3, dtype="float64"))
    with torch.no_grad():
        full.b_dec.normal_(); full.b_enc.normal_(std=0.1)
    x = torch.randn(64, 16, dtype=torch.float64) * 2
    dead = torch.zeros(32, dtype=torch.bool); dead[torch.randperm(32)[:14]] = True
    shards = make_shards(dist.get_world_size(), dist.get_rank(), dist.get_world_size(), 32)
    local = local_slice(full, shards, "cpu")
    out = sharded_loss(local, x, None, shards, dead_mask=dead, k_aux=5, aux_coefficient=1 / 32)
    out.loss.backward()
    reduce_gradients(local, shards, out.fired.float())
    grads = SAE(local.cfg)
    grads.load_state_dict({n: p.grad for n, p in local.named_parameters()})
    whole = gather_full(grads, shards, 32)
    if dist.get_rank() == 0:
        torch.save({"x": x, "dead": dead, "weights": full.state_dict(), "loss": out.loss.detach(),
                    "parts": {k: v.detach() for k, v in out.parts.items()}, "fired": out.fired,
                    "grads": whole.state_dict()}, grads_to)
    dist.destroy_process_group()
    sys.exit(0)
def progress(p):
    if kill_at and p.step >= kill_at and int(os.environ["RANK"]) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
cfgs = [TrainConfig.build(**c) for c in settings] if isinstance(settings, list) else TrainConfig.build(**settings)
nanosae.train(cfgs, progress=progress)
"""


def torchrun(tmp_path, nproc: int, settings: dict, kill_at: int = 0, grads_to: str = "") -> subprocess.CompletedProcess:
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    for _ in range(2):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(nproc),
                str(script),
                json.dumps(settings),
                str(kill_at),
                grads_to,
            ],
            capture_output=True,
            text=True,
            env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()},
            timeout=300,
        )
        # a gloo worker thread can abort a finished rank at interpreter exit (see test_two_processes_equal_one)
        if kill_at or proc.returncode == 0 or "exitcode: -6" not in proc.stderr:
            return proc
    return proc


@pytest.fixture(scope="module")
def sharded_run(planted_store, tmp_path_factory):
    """One run with the latents split over two processes (checkpoints every 5 steps)."""
    tmp = tmp_path_factory.mktemp("sharded")
    store, _ = planted_store
    settings = SETTINGS | dict(acts=str(store.path), out=str(tmp / "two"), shard_latents=2)
    proc = torchrun(tmp, 2, settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, settings


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_step_loss_and_gradients_equal_one_process(tmp_path):
    from nanosae.train.losses import sae_loss

    proc = torchrun(tmp_path, 2, {}, grads_to=str(tmp_path / "grads.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    full = SAE(nanosae.SAEConfig(d_in=16, d_sae=32, architecture="topk", k=3, dtype="float64"))
    full.load_state_dict(got["weights"])
    out = sae_loss(full, got["x"], dead_mask=got["dead"], k_aux=5, aux_coefficient=1 / 32)
    out.loss.backward()
    assert set(out.parts) == set(got["parts"]) == {"mse", "auxk"}
    for name in out.parts:
        assert torch.allclose(out.parts[name], got["parts"][name], rtol=1e-10), name
    assert torch.equal(out.fired, got["fired"])
    for name, p in full.named_parameters():
        assert torch.allclose(p.grad, got["grads"][name], atol=1e-10), name


def test_two_shards_train_as_one_process(sharded_run, planted_store):
    tmp, settings = sharded_run
    # the same run in one process, without the decoder refit (which sharded runs do not do)
    one = nanosae.train(
        TrainConfig.build(**(settings | dict(out=str(tmp / "one"), shard_latents=0, refit_decoder=False)))
    )
    two = SAE.load(tmp / "two" / "sae")  # the ordinary single-file SAE, whole
    assert two.cfg.d_sae == 128
    for name, tensor in one.sae.state_dict().items():
        assert torch.allclose(tensor, two.state_dict()[name], atol=1e-4), name
    m_one, m_two = metrics(tmp / "one"), metrics(tmp / "two")
    assert [m["step"] for m in m_two] == list(range(1, 21))
    assert sum("auxk" in m for m in m_two) >= 10  # AuxK was exercised
    for a, b in zip(m_one, m_two):
        for key in ("loss", "mse", "auxk", "l0", "fvu", "dead_fraction"):
            assert (key in a) == (key in b) and a.get(key, 0) == pytest.approx(b.get(key, 0), rel=1e-4, abs=1e-6), key
    step = tmp / "two" / "checkpoints" / "step_20"
    assert sorted(p.name for p in step.iterdir()) == ["shard-0-of-2.pt", "shard-1-of-2.pt", "state.pt"]


def test_sharded_resume_is_exact(sharded_run):
    tmp, settings = sharded_run
    killed = settings | dict(out=str(tmp / "killed"))
    proc = torchrun(tmp, 2, killed, kill_at=17)
    assert proc.returncode != 0
    assert (tmp / "killed" / "checkpoints" / "step_15" / "shard-1-of-2.pt").exists()
    assert not (tmp / "killed" / "sae").exists()
    proc = torchrun(tmp, 2, killed | dict(resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, resumed = SAE.load(tmp / "two" / "sae"), SAE.load(tmp / "killed" / "sae")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert [m["step"] for m in metrics(tmp / "killed")] == list(range(1, 21))


def test_a_truncated_slice_falls_back_to_the_previous_checkpoint(sharded_run):
    tmp, settings = sharded_run
    killed = settings | dict(out=str(tmp / "truncated"))
    assert torchrun(tmp, 2, killed, kill_at=17).returncode != 0
    shard = tmp / "truncated" / "checkpoints" / "step_15" / "shard-1-of-2.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a full disk, a kill during a copy
    proc = torchrun(tmp, 2, killed | dict(resume=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_15 is unreadable" in proc.stderr
    whole, resumed = SAE.load(tmp / "two" / "sae"), SAE.load(tmp / "truncated" / "sae")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_shards_combine_with_data_parallelism(sharded_run):
    """Four processes: two replicas of two latent shards, each replica training on half of every batch."""
    tmp, settings = sharded_run
    proc = torchrun(tmp, 4, settings | dict(out=str(tmp / "four")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, four = SAE.load(tmp / "two" / "sae"), SAE.load(tmp / "four" / "sae")
    for name, tensor in two.state_dict().items():
        assert torch.allclose(tensor, four.state_dict()[name], atol=1e-4), name


def test_refusals(planted_store, tmp_path):
    store, _ = planted_store
    with pytest.raises(ConfigError, match="torchrun"):
        nanosae.train(
            TrainConfig.build(**(SETTINGS | dict(acts=str(store.path), out=str(tmp_path / "r"), shard_latents=2)))
        )
    with pytest.raises(ConfigError, match="shard_latents"):
        TrainConfig.build(shard_latents=-1)


def test_saes_spread_over_processes_train_as_in_one(planted_store, tmp_path):
    """Three SAEs of one stream over two processes (rank 0 trains two, rank 1 one), each on every whole batch."""
    store, _ = planted_store
    common = dict(
        acts=str(store.path),
        d_sae=64,
        batch_size=512,
        tokens=512 * 10,
        log_every=5,
        checkpoint_every=0,
        lr=3e-3,
        distribute_saes=True,
    )
    spread = [common | dict(k=k, out=str(tmp_path / f"spread_k{k}")) for k in (2, 4, 6)]
    proc = torchrun(tmp_path, 2, spread)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = {line.split("process ")[1] for line in proc.stderr.splitlines() if "trains" in line}
    assert trained == {f"0 trains {spread[0]['out']}, {spread[2]['out']}", f"1 trains {spread[1]['out']}"}
    alone = nanosae.train(
        [TrainConfig.build(**(c | dict(out=c["out"].replace("spread", "one"), distribute_saes=False))) for c in spread]
    )
    for cfg, one in zip(spread, alone):
        two = SAE.load(tmp_path / cfg["out"] / "sae")
        assert two.cfg.k == one.sae.cfg.k
        for name, tensor in one.sae.state_dict().items():
            assert torch.allclose(tensor, two.state_dict()[name], atol=1e-5), name
    with pytest.raises(ConfigError, match="at least one SAE per process"):
        from nanosae.train.trainer import owners

        owners([TrainConfig.build(**spread[0])], world=2)
