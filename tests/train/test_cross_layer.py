"""Cross-layer transcoders: the joint loss and its gradients equal a dense hand-written CLT, training learns what
only a cross-layer decoder can (a later MLP driven by an earlier layer's input), a killed run resumes to the same
weights, and the saved set reads back checked."""

import json

import pytest
import torch

import nanosae
from nanosae import SAE, SAEConfig, TrainConfig
from nanosae.data import write_store
from nanosae.errors import ConfigError, FormatError
from nanosae.interp import circuits as C
from nanosae.rundir import TranscoderSetDir
from nanosae.sae import kernels
from nanosae.train.cross_layer import CROSS_FILE
from nanosae.train.losses import sae_loss

D, ATOMS, N = 16, 24, 12288


@pytest.fixture(scope="module")
def two_layer_stores(tmp_path_factory):
    """Layer 0's input is a sparse mix of atoms; layer 0's MLP output and layer 1's are other mixes of the same
    codes, while layer 1's input is unrelated noise: only features read at layer 0 can predict layer 1's output."""
    g = torch.Generator().manual_seed(0)
    codes = torch.zeros(N, ATOMS)
    picks = torch.rand(N, ATOMS, generator=g).topk(3, dim=1).indices
    codes.scatter_(1, picks, 1 + torch.rand(N, 3, generator=g))
    atoms = lambda: torch.nn.functional.normalize(torch.randn(ATOMS, D, generator=g), dim=1)
    acts = {
        "blocks.0.ln2.hook_normalized": codes @ atoms(),
        "blocks.0.hook_mlp_out": codes @ atoms(),
        "blocks.1.ln2.hook_normalized": torch.randn(N, D, generator=g),
        "blocks.1.hook_mlp_out": codes @ atoms(),
    }
    root = tmp_path_factory.mktemp("clt")
    return {hook: write_store(root / hook, x, hook=hook).path for hook, x in acts.items()}


def set_cfgs(stores, out, cross_layer=True, **kw):
    common = dict(d_sae=32, k=3, batch_size=256, tokens=256 * 200, lr=1e-2, log_every=1, cross_layer=cross_layer) | kw
    return [
        TrainConfig.build(
            acts=str(stores[f"blocks.{L}.ln2.hook_normalized"]),
            acts_out=str(stores[f"blocks.{L}.hook_mlp_out"]),
            out=str(out / f"layer_{L}"),
            **common,
        )
        for L in (0, 1)
    ]


def fvu(tset, stores, layer):
    x = {L: nanosae.ActivationStore(stores[f"blocks.{L}.ln2.hook_normalized"]).tokens(0, N) for L in (0, 1)}
    y = nanosae.ActivationStore(stores[f"blocks.{layer}.hook_mlp_out"]).tokens(0, N)
    with torch.no_grad():
        z = {L: tset[L].encode(x[L]) for L in (0, 1)}
        err = (tset.output(layer, z, x[layer]) - y).pow(2).sum()
    return float(err / (y - y.mean(0)).pow(2).sum())


def assert_same_sets(a_dir, b_dir, cross_layer):
    """Two sets' transcoders (and cross-layer decoders) are bit-identical."""
    a, b = read_set(a_dir, cross_layer), read_set(b_dir, cross_layer)
    for L in (0, 1):
        for name, tensor in b[L].state_dict().items():
            assert torch.equal(tensor, a[L].state_dict()[name]), (L, name)
    if cross_layer:
        assert torch.equal(a.later[0], b.later[0])


def read_set(out, cross_layer):
    TranscoderSetDir(out).write_manifest("synthetic", [0, 1], cross_layer)
    return C.load_transcoders(out)[1]


def test_only_the_cross_layer_decoder_predicts_a_later_mlp_driven_by_an_earlier_input(two_layer_stores, tmp_path):
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "clt"))
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "per_layer", cross_layer=False))
    clt, per_layer = read_set(tmp_path / "clt", True), read_set(tmp_path / "per_layer", False)
    assert clt.cross_layer and set(clt.later) == {0} and not per_layer.cross_layer
    assert fvu(per_layer, two_layer_stores, 1) > 0.9  # layer 1's own input says nothing about its output
    assert fvu(clt, two_layer_stores, 1) < 0.3  # layer 0's features do
    assert fvu(clt, two_layer_stores, 0) < 0.3
    # each feature's decoder rows, own and later, have unit norm together
    norms = (clt[0].W_dec.pow(2).sum(1) + clt.later[0].pow(2).sum((1, 2))).sqrt()
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_joint_loss_and_gradients_equal_a_dense_hand_written_clt():
    """Layer 1's loss takes layer 0's latents through the cross decoder (sparse kernels, as training runs it):
    loss and every gradient equal the dense formula's, in float64."""
    torch.manual_seed(0)
    saes = [
        SAE(
            SAEConfig(
                d_in=D,
                d_sae=32,
                architecture="topk",
                k=4,
                hook_name=f"blocks.{L}.ln2.hook_normalized",
                hook_name_out=f"blocks.{L}.hook_mlp_out",
                d_out=D,
                dtype="float64",
            )
        )
        for L in (0, 1)
    ]
    cross = torch.randn(32, D, dtype=torch.float64, requires_grad=True)
    x = [torch.randn(64, D, dtype=torch.float64) for _ in range(2)]
    y = [torch.randn(64, D, dtype=torch.float64) for _ in range(2)]
    out0 = sae_loss(saes[0], x[0], y[0])
    later = kernels.sparse_decode(*out0.codes, cross)
    out1 = sae_loss(saes[1], x[1], y[1], added=later)
    total = out0.loss + out1.loss
    params = [p for s in saes for p in (s.W_enc, s.b_enc, s.W_dec, s.b_dec)] + [cross]
    got = torch.autograd.grad(total, params)

    def dense(*p):
        z = []
        for L, (W_enc, b_enc) in enumerate([p[0:2], p[4:6]]):
            pre = torch.relu(x[L] @ W_enc + b_enc)
            top = pre.topk(4, dim=1)
            z.append(torch.zeros_like(pre).scatter(1, top.indices, top.values))
        pred0 = z[0] @ p[2] + p[3]
        pred1 = z[1] @ p[6] + p[7] + z[0] @ p[8]
        return (pred0 - y[0]).pow(2).sum(1).mean() + (pred1 - y[1]).pow(2).sum(1).mean()

    reference = [p.detach().clone().requires_grad_(True) for p in params]
    loss = dense(*reference)
    assert float(total.detach()) == pytest.approx(float(loss.detach()), rel=1e-12)
    for g, r, name in zip(
        got,
        torch.autograd.grad(loss, reference),
        ["W_enc0", "b_enc0", "W_dec0", "b_dec0", "W_enc1", "b_enc1", "W_dec1", "b_dec1", "cross"],
    ):
        assert torch.allclose(g, r, atol=1e-10), name
    assert got[0].abs().sum() > 0 and got[-1].abs().sum() > 0


def test_a_killed_cross_layer_run_resumes_to_the_same_weights(two_layer_stores, tmp_path):
    common = dict(tokens=256 * 20, checkpoint_every=5)

    def stop_at_7(p):
        if p.step == 7:
            raise KeyboardInterrupt  # checkpoints where it stands, as Ctrl-C does

    with pytest.raises(KeyboardInterrupt):
        nanosae.train(set_cfgs(two_layer_stores, tmp_path / "a", **common), progress=stop_at_7)
    assert (tmp_path / "a" / "cross_layer" / "checkpoints" / "step_7" / "state.pt").exists()
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "a", resume=True, **common))
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "b", **common))
    a, b = read_set(tmp_path / "a", True), read_set(tmp_path / "b", True)
    assert torch.equal(a.later[0], b.later[0])
    for L in (0, 1):
        for name, tensor in b[L].state_dict().items():
            assert torch.equal(tensor, a[L].state_dict()[name]), (L, name)


@pytest.mark.parametrize("cross_layer", [False, True])
def test_a_set_killed_between_two_layers_checkpoints_resumes_from_the_newest_step_all_have(
    two_layer_stores, tmp_path, cross_layer
):
    """Interrupted after layer 0's step 12 but before layer 1's (per-layer: layer 1 checkpoints at 11), or killed
    between the layers' writes of step 12 (cross-layer): the set resumes at step 10, which every layer (and the
    cross-layer decoders) has, and ends where the uninterrupted set ends."""
    import shutil

    common = dict(tokens=256 * 20, checkpoint_every=5, cross_layer=cross_layer)

    def stop_at_12(p):
        if p.step == 12:
            raise KeyboardInterrupt  # every layer checkpoints at 12, as Ctrl-C does

    with pytest.raises(KeyboardInterrupt):
        nanosae.train(set_cfgs(two_layer_stores, tmp_path / "a", **common), progress=stop_at_12)
    steps = lambda L: sorted(int(p.name[5:]) for p in (tmp_path / "a" / f"layer_{L}" / "checkpoints").glob("step_*"))
    if cross_layer:
        shutil.rmtree(tmp_path / "a" / "layer_1" / "checkpoints" / "step_12")  # the kill came before layer 1's write
    assert steps(0) == [10, 12] and steps(1) == [10, 11] if not cross_layer else steps(1) == [10]
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "a", resume=True, **common))
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "b", **common))
    assert_same_sets(tmp_path / "a", tmp_path / "b", cross_layer)


KILL_SET = r"""
import json, os, signal, sys
from pathlib import Path
import nanosae
from tests.train.test_cross_layer import set_cfgs
stores, out, kill_at, cross = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
def progress(p):  # the first layer to report step kill_at dies there: a per-layer set's second layer has not stepped
    if p.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
nanosae.train(set_cfgs(stores, out, tokens=256 * 24, checkpoint_every=4, cross_layer=cross), progress=progress)
"""


@pytest.mark.parametrize("cross_layer", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_set_killed_at_a_random_step_resumes_to_the_uninterrupted_weights(
    two_layer_stores, tmp_path, cross_layer, seed
):
    """kill -9 at a random step (for a per-layer set, after the first layer's step and before the second's):
    the same command with --resume ends with the uninterrupted set's weights, bit for bit."""
    import os
    import random
    import subprocess
    import sys

    kill_at = random.Random(seed).randrange(5, 23)
    stores = {k: str(v) for k, v in two_layer_stores.items()}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SET, json.dumps(stores), str(tmp_path / "a"), str(kill_at), str(int(cross_layer))],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    common = dict(tokens=256 * 24, checkpoint_every=4, cross_layer=cross_layer)
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "a", resume=True, **common))
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "b", **common))
    assert_same_sets(tmp_path / "a", tmp_path / "b", cross_layer)


def test_cross_layer_refusals_and_a_corrupt_decoder_file(two_layer_stores, tmp_path):
    with pytest.raises(ConfigError, match="TopK or BatchTopK"):
        nanosae.train(set_cfgs(two_layer_stores, tmp_path / "relu", architecture="relu"))
    assert not (tmp_path / "relu").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="with --transcoders"):
        from nanosae.train.sweep import expand_sweep

        expand_sweep({"cross_layer": True, "out": str(tmp_path / "x")})
    nanosae.train(set_cfgs(two_layer_stores, tmp_path / "ok", tokens=256 * 4))
    from safetensors.torch import load_file, save_file

    good = (tmp_path / "ok" / "layer_0" / CROSS_FILE).read_bytes()
    rows = load_file(tmp_path / "ok" / "layer_0" / CROSS_FILE)
    rows["W_dec_later"][0, 0, 0] = float("nan")
    save_file(rows, tmp_path / "ok" / "layer_0" / CROSS_FILE, metadata={"later_layers": "1"})
    with pytest.raises(FormatError, match=f"{CROSS_FILE}: the cross-layer decoders hold NaN"):
        read_set(tmp_path / "ok", True)
    (tmp_path / "ok" / "layer_0" / CROSS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(FormatError, match=CROSS_FILE):
        read_set(tmp_path / "ok", True)
    (tmp_path / "ok" / "layer_0" / CROSS_FILE).write_bytes(good)
    manifest = TranscoderSetDir(tmp_path / "ok").manifest
    valid = json.loads(manifest.read_text())
    for bad, says in [
        ({"layers": []}, "layers must be an object"),
        ({"layers": {"x": "layer_0"}}, "not a layer number"),
        ({"layers": {"0": "../../etc"}}, "relative path inside"),
        ({"layers": {"0": "/etc"}}, "relative path"),
        ({"layers": {"0": 5}}, "relative path"),
        ({"model": 3}, "model must be"),
        ({"cross_layer": "yes"}, "cross_layer must be"),
    ]:
        manifest.write_text(json.dumps(valid | bad))
        with pytest.raises(FormatError, match=says):
            C.load_transcoders(tmp_path / "ok")
