"""Dictionaries trained by other tools, read by SAE.load: compared with the outputs those tools compute
themselves (fixtures written by the peer's own code: tests/fixtures/*/make.py)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanosae import SAE
from nanosae.errors import FormatError
from nanosae.sae.foreign import hook_names
from tests.conftest import mapped_from

SPARSIFY = Path(__file__).parents[1] / "fixtures" / "sparsify"


@pytest.mark.parametrize("hookpoint", ["layers.1", "layers.1.mlp"])
def test_sparsify_coders_give_sparsifys_own_outputs(hookpoint, tmp_path):
    expected = load_file(SPARSIFY / "expected.safetensors")
    sae = SAE.load(SPARSIFY / "checkpoint" / hookpoint)
    x_hat, z = sae(expected["x"])
    torch.testing.assert_close(x_hat, expected[f"{hookpoint}/sae_out"], rtol=1e-5, atol=1e-5)
    picked = torch.zeros_like(z).scatter(
        1, expected[f"{hookpoint}/latent_indices"], expected[f"{hookpoint}/latent_acts"]
    )
    torch.testing.assert_close(z, picked, rtol=1e-5, atol=1e-5)  # the same latents with the same values
    sae.save(tmp_path / "ours")  # and it is an SAE like any other from then on
    torch.testing.assert_close(SAE.load(tmp_path / "ours")(expected["x"])[0], x_hat)


def test_sparsify_hookpoints_map_onto_nanosae_hooks():
    assert hook_names("layers.6", False) == ("blocks.6.hook_resid_post", None)
    assert hook_names("model.layers.6.mlp", False) == ("blocks.6.hook_mlp_out", None)
    assert hook_names("layers.6.mlp", True) == ("blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out")
    assert hook_names("gpt_neox.layers.2.attention", False) == ("blocks.2.hook_attn_out", None)
    assert hook_names("transformer.h.3", False) == ("blocks.3.hook_resid_post", None)
    assert hook_names("embed_tokens", False) == ("embed_tokens", None)  # kept: the user names it with --hook


def test_a_sparsify_checkpoint_root_names_its_hookpoints(tmp_path):
    with pytest.raises(FormatError, match="give one hookpoint folder: .*layers.1"):
        SAE.load(SPARSIFY / "checkpoint")


def test_damaged_sparsify_files_are_one_line(tmp_path):
    coder = tmp_path / "layers.1"
    shutil.copytree(SPARSIFY / "checkpoint" / "layers.1", coder)
    cfg = json.loads((coder / "cfg.json").read_text())
    for change, says in [
        ({"activation": "groupmax"}, "groupmax"),
        ({"k": 0}, "k must be a positive integer"),
        ({"d_in": "16"}, "d_in must be"),
        ({"num_latents": 64}, "shape"),
    ]:
        (coder / "cfg.json").write_text(json.dumps(cfg | change))
        with pytest.raises(FormatError, match=says):
            SAE.load(coder)
    (coder / "cfg.json").write_text(json.dumps(cfg))
    weights = (coder / "sae.safetensors").read_bytes()
    (coder / "sae.safetensors").write_bytes(weights[:100])
    with pytest.raises(FormatError, match="sae.safetensors is corrupt"):
        SAE.load(coder)


def gemma_scope_file(root, d_in=12, d_sae=40, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    path = (
        root
        / "models--google--gemma-scope-2b-pt-res"
        / "snapshots"
        / "abc"
        / "layer_3"
        / "width_16k"
        / "average_l0_40"
        / "params.npz"
    )
    path.parent.mkdir(parents=True)
    arrays = {
        "W_enc": rng.normal(size=(d_in, d_sae)),
        "W_dec": rng.normal(size=(d_sae, d_in)),
        "b_enc": rng.normal(size=d_sae) * 0.1,
        "b_dec": rng.normal(size=d_in),
        "threshold": rng.uniform(0, 1, d_sae),
    }
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})
    return path, {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}


def test_gemma_scope_params_are_its_jumprelu_equations(tmp_path):
    """z = pre·1[pre > θ] with pre = x W_enc + b_enc (no b_dec subtracted), x̂ = z W_dec + b_dec: the release's
    definition, written out here; the hook and model come from the release's path."""
    path, p = gemma_scope_file(tmp_path)
    x = torch.randn(20, 12)
    pre = x @ p["W_enc"] + p["b_enc"]
    z = pre * (pre > p["threshold"])
    for where in (path, path.parent):  # the file or its folder
        sae = SAE.load(where)
        assert sae.cfg.architecture == "jumprelu" and sae.cfg.hook_name == "blocks.3.hook_resid_post"
        assert sae.cfg.model_name == "google/gemma-2-2b"
        torch.testing.assert_close(sae.encode(x), z)
        torch.testing.assert_close(sae(x)[0], z @ p["W_dec"] + p["b_dec"])
    assert 0 < (z > 0).float().mean() < 1  # the threshold really cuts


def test_damaged_gemma_scope_files_are_one_line(tmp_path):
    import numpy as np

    path, p = gemma_scope_file(tmp_path)
    np.savez(path, W_enc=p["W_enc"].numpy())
    with pytest.raises(FormatError, match="params.npz: missing W_dec"):
        SAE.load(path)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FormatError, match="params.npz is not a readable .npz"):
        SAE.load(path)
    np.savez(path, **({k: v.numpy() for k, v in p.items()} | {"W_enc": np.full((12, 40), np.nan, dtype=np.float32)}))
    with pytest.raises(FormatError, match="NaN"):
        SAE.load(path)


DL = Path(__file__).parents[1] / "fixtures" / "dictionary_learning"
DL_CLASSES = [
    "AutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
    "GatedAutoEncoder",
]


@pytest.mark.parametrize("dict_class", DL_CLASSES)
def test_dictionary_learning_dictionaries_give_their_own_outputs(dict_class):
    """Each class as its from_pretrained loads it (AutoEncoder's decoder normalised), on the same input."""
    expected = load_file(DL / "expected.safetensors")
    sae = SAE.load(DL / dict_class)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.model_name == "tiny"
    x_hat, z = sae(expected["x"])
    torch.testing.assert_close(x_hat, expected[f"{dict_class}/x_hat"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, expected[f"{dict_class}/features"], rtol=1e-5, atol=1e-5)
    assert 0 < (z > 0).float().mean() < 1


def test_damaged_dictionary_learning_files_are_one_line(tmp_path):
    folder = tmp_path / "ae"
    shutil.copytree(DL / "BatchTopKSAE", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"trainer": config["trainer"] | {"dict_class": "ConvSAE"}}))
    with pytest.raises(FormatError, match="'ConvSAE' is not one nanosae reads"):
        SAE.load(folder)
    (folder / "config.json").write_text(json.dumps({"trainer": "x"}))
    with pytest.raises(FormatError, match="trainer.dict_class 'None' is not one"):
        SAE.load(folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps(config))
    state = torch.load(folder / "ae.pt", weights_only=True)
    del state["b_dec"]
    torch.save(state, folder / "ae.pt")
    with pytest.raises(FormatError, match="missing b_dec for a BatchTopKSAE"):
        SAE.load(folder)
    (folder / "ae.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(FormatError, match="ae.pt: not a readable state dict"):
        SAE.load(folder)


def hub_cache(home: Path, repo: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache holding one snapshot of `repo`, laid out as huggingface_hub lays it out (blobs named
    by content, snapshot files linking to them, refs/main naming the commit)."""
    import hashlib

    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_hub_ids_resolve_from_the_cache_offline(tmp_path, monkeypatch, capsys):
    """hf:ORG/REPO/SUBPATH reads a sparsify hookpoint and a Gemma Scope file from an offline cache; nothing is
    written into the cache; an id the cache lacks is one line."""
    from tests.test_hostile_inputs import refused, run_cli

    gemma, _ = gemma_scope_file(tmp_path / "made")
    hub_cache(
        tmp_path / "hf",
        "EleutherAI/sae-tiny",
        {f"layers.1/{n}": SPARSIFY / "checkpoint" / "layers.1" / n for n in ("cfg.json", "sae.safetensors")},
    )
    hub_cache(tmp_path / "hf", "google/gemma-scope-2b-pt-res", {"layer_3/width_16k/average_l0_40/params.npz": gemma})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sae = SAE.load("hf:EleutherAI/sae-tiny/layers.1")
    direct = SAE.load(SPARSIFY / "checkpoint" / "layers.1")
    assert torch.equal(sae.W_enc, direct.W_enc) and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    scope = SAE.load("hf:google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_40")
    assert scope.cfg.hook_name == "blocks.3.hook_resid_post" and scope.cfg.model_name == "google/gemma-2-2b"
    before = sorted(p.name for p in (tmp_path / "hf").rglob("*"))
    assert run_cli(["info", "hf:EleutherAI/sae-tiny/layers.1"], capsys)[0] == 0
    refused(["features", "hf:EleutherAI/sae-tiny/layers.1", "--model", "x"], capsys, "give --out", tmp_path / "hf")
    assert (
        run_cli(["export", "saelens", "hf:EleutherAI/sae-tiny/layers.1", "--out", tmp_path / "mine" / "sae"], capsys)[0]
        == 0
    )  # a copy of one's own, in nanosae's (= SAELens's) layout
    assert torch.equal(SAE.load(tmp_path / "mine" / "sae").W_dec, direct.W_dec)
    assert sorted(p.name for p in (tmp_path / "hf").rglob("*")) == before
    with pytest.raises(FormatError, match="hf:someone/absent: not in the local Hugging Face cache"):
        SAE.load("hf:someone/absent")
    with pytest.raises(FormatError, match="has no 'layers.9'"):
        SAE.load("hf:EleutherAI/sae-tiny/layers.9")


class _Payload:
    """Runs code when unpickled (what a plain torch.load of a hostile ae.pt would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_ae_pt_never_runs(tmp_path):
    folder = tmp_path / "ae"
    shutil.copytree(DL / "AutoEncoderTopK", folder)
    marker = tmp_path / "payload_ran"
    torch.save({"encoder.weight": _Payload(marker)}, folder / "ae.pt")
    with pytest.raises(FormatError, match="ae.pt: not a readable state dict"):
        SAE.load(folder)
    assert not marker.exists()


def scaled_sae(**kw) -> "SAE":
    """A TopK SAE whose every part matters: an activation scale, biases off zero, rows not unit norm."""
    from nanosae import SAEConfig

    torch.manual_seed(0)
    cfg = dict(d_in=16, d_sae=48, architecture="topk", k=4, hook_name="blocks.2.hook_resid_post", activation_scale=2.5)
    sae = SAE(SAEConfig(**(cfg | kw))).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3)
    return sae


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip transcoder", "transcoder subtracting b_dec"])
def test_export_sparsify_reads_back_to_the_same_outputs(tmp_path, kind, capsys):
    """export sparsify, then read with the sparsify reader (checked above against sparsify's own forward)."""
    from tests.test_hostile_inputs import run_cli

    io = dict(
        hook_name="blocks.2.ln2.hook_normalized", hook_name_out="blocks.2.hook_mlp_out", d_out=16, output_scale=1.5
    )
    kw = {
        "sae": {},
        "transcoder": io | {"apply_b_dec_to_input": False},
        "skip transcoder": io | {"apply_b_dec_to_input": False, "skip_connection": True},
        "transcoder subtracting b_dec": io | {"apply_b_dec_to_input": True},
    }[kind]
    sae = scaled_sae(**kw)
    sae.save(tmp_path / "run" / "sae")
    assert run_cli(["export", "sparsify", tmp_path / "run", "--out", tmp_path / "sparsify"], capsys)[0] == 0
    point = "layers.2" if kind == "sae" else "layers.2.mlp"
    assert sorted(p.name for p in (tmp_path / "sparsify" / point).iterdir()) == ["cfg.json", "sae.safetensors"]
    back = SAE.load(tmp_path / "sparsify" / point)
    x = torch.randn(64, 16) * 3
    torch.testing.assert_close(back(x)[0], sae(x)[0], rtol=1e-4, atol=1e-4)
    assert back.cfg.hook_name == sae.cfg.hook_name and back.cfg.hook_name_out == sae.cfg.hook_name_out


def test_export_sparsify_refuses_what_sparsify_cannot_hold(tmp_path, capsys):
    from tests.test_hostile_inputs import refused

    scaled_sae(architecture="relu", k=None).save(tmp_path / "relu" / "sae")
    refused(
        ["export", "sparsify", tmp_path / "relu", "--out", tmp_path / "x"],
        capsys,
        "TopK sparse coders only",
        tmp_path / "relu",
    )
    assert not (tmp_path / "x").exists()


def test_a_dictionary_of_another_model_is_refused_naming_the_file(tiny_llama_dir, tmp_path, capsys):
    """sparsify's 16-wide coder on the 32-wide tiny model, or a layer the model lacks: one line naming the file."""
    from tests.test_hostile_inputs import refused

    coder = SPARSIFY / "checkpoint" / "layers.1"
    refused(
        ["steer", "w5", "--sae", coder, "--model", tiny_llama_dir, "--feature", "1=+2"],
        capsys,
        "reads 16-wide activations at blocks.1.hook_resid_post",
        tmp_path,
    )
    deep = tmp_path / "layers.9"
    shutil.copytree(coder, deep)
    refused(
        ["steer", "w5", "--sae", deep, "--model", tiny_llama_dir, "--feature", "1=+2"],
        capsys,
        "has 3 layers",
        tmp_path / "nothing",
    )


def test_gemma_scope_transcoders_read_the_mlp_input_and_write_its_output(tmp_path):
    """gemma-scope-2b-pt-transcoders: the same JumpReLU equations, as a transcoder of layer L's MLP."""
    import numpy as np

    path, p = gemma_scope_file(tmp_path)
    moved = tmp_path / "models--google--gemma-scope-2b-pt-transcoders" / "layer_5" / "w" / "params.npz"
    moved.parent.mkdir(parents=True)
    np.savez(moved, **{k: v.numpy() for k, v in p.items()})
    tc = SAE.load(moved)
    assert (tc.cfg.hook_name, tc.cfg.hook_name_out) == ("blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out")
    x = torch.randn(9, 12)
    pre = x @ p["W_enc"] + p["b_enc"]
    torch.testing.assert_close(tc(x)[0], (pre * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_large_files_are_mapped_not_copied(tmp_path):
    """nanosae's own safetensors and Gemma Scope's uncompressed .npz are mapped copy-on-write: the weights lie in
    the file's mapping, give the file's values, and writing to them leaves the file as it was."""
    path, p = gemma_scope_file(tmp_path)
    sae = SAE.load(path)
    assert mapped_from(sae.W_enc, path) and mapped_from(sae.W_dec, path)
    assert torch.equal(sae.W_enc, p["W_enc"]) and torch.equal(sae.threshold, p["threshold"])
    with torch.no_grad():
        sae.W_enc.zero_()
    assert torch.equal(SAE.load(path).W_enc, p["W_enc"])
    own = tmp_path / "own"
    sae.save(own)
    back = SAE.load(own)
    assert mapped_from(back.W_dec, own / "sae_weights.safetensors")
    assert torch.equal(back.W_dec, sae.W_dec) and torch.equal(back.W_enc, torch.zeros_like(sae.W_enc))
