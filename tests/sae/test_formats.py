import json
import os

import pytest
import torch
from safetensors.torch import save_file

from nanosae import SAE, ConfigError, FormatError, SAEConfig

ARCHS = [("relu", None), ("topk", 4), ("batchtopk", 4), ("jumprelu", None), ("gated", None), ("matryoshka", 4)]


def randomized(arch, k):
    sae = SAE(
        SAEConfig(
            d_in=8,
            d_sae=24,
            architecture=arch,
            k=k,
            hook_name="blocks.3.hook_resid_post",
            model_name="tiny",
            context_size=64,
        )
    )
    with torch.no_grad():
        for t in sae.state_dict(keep_vars=True).values():
            t.copy_(torch.rand_like(t))
    return sae


@pytest.mark.parametrize("arch,k", ARCHS)
def test_round_trip_bit_identical(tmp_path, arch, k):
    sae = randomized(arch, k)
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    a, b = sae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    for key in (
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "hook_name",
        "model_name",
        "context_size",
        "dataset_path",
    ):
        assert key in cfg
    assert cfg["hook_layer"] == 3
    assert not [p for p in os.listdir(tmp_path / "sae") if p.endswith(".tmp")]


def test_saelens_names_on_disk(tmp_path):
    from safetensors.torch import load_file

    randomized("gated", None).save(tmp_path)
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {
        "W_enc",
        "W_dec",
        "b_dec",
        "b_gate",
        "b_mag",
        "r_mag",
    }
    randomized("jumprelu", None).save(tmp_path)
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}


def test_older_saelens_keys(tmp_path):
    cfg = {
        "d_in": 8,
        "d_sae": 24,
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "hook_point": "blocks.1.hook_resid_pre",
        "dtype": "torch.float32",
        "normalize_activations": "expected_average_only_in",
        "device": "cuda",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    tensors = {
        "W_enc": torch.randn(8, 24),
        "b_enc": torch.randn(24),
        "W_dec": torch.randn(24, 8),
        "b_dec": torch.randn(8),
    }
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    sae = SAE.load(tmp_path)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name) == ("topk", 3, "blocks.1.hook_resid_pre")
    assert torch.equal(sae.W_enc, tensors["W_enc"])


def test_saelens_v6_metadata_and_log_threshold(tmp_path):
    cfg = {
        "d_in": 8,
        "d_sae": 24,
        "architecture": "jumprelu",
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "m"},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    tensors = {
        "W_enc": torch.randn(8, 24),
        "b_enc": torch.randn(24),
        "W_dec": torch.randn(24, 8),
        "b_dec": torch.randn(8),
        "log_threshold": torch.randn(24),
    }
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    sae = SAE.load(tmp_path)
    assert sae.cfg.hook_name == "blocks.2.hook_resid_post" and not sae.cfg.apply_b_dec_to_input
    assert torch.allclose(sae.threshold, tensors["log_threshold"].exp())


# ---- OpenAI sparse_autoencoder --------------------------------------------------------------
def openai_reference(sd, x, normalize, k):
    """OpenAI's forward, restated from its description (not from our code)."""
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        std = centred.std(dim=-1, keepdim=True)
        x = centred / (std + 1e-5)
    lat = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if k is None:
        lat = torch.relu(lat)
    else:
        top = torch.topk(lat, k=k, dim=-1)
        lat = torch.zeros_like(lat).scatter_(-1, top.indices, torch.relu(top.values))
    rec = lat @ sd["decoder.weight"].T + sd["pre_bias"]
    if normalize:
        rec = rec * std + mu
    return rec, lat


def openai_state_dict(k):
    d_in, d_sae = 16, 48
    sd = {
        "pre_bias": torch.randn(d_in),
        "latent_bias": torch.randn(d_sae) * 0.1,
        "encoder.weight": torch.randn(d_sae, d_in),
        "decoder.weight": torch.randn(d_in, d_sae),
        "stats_last_nonzero": torch.zeros(d_sae, dtype=torch.long),
        "latents_activation_frequency": torch.zeros(d_sae),
        "latents_mean_square": torch.zeros(d_sae),
    }
    if k is None:
        sd["activation"] = "ReLU"
    else:
        sd.update(
            {
                "activation": "TopK",
                "activation_state_dict": {"k": k, "postact_fn": "ReLU"},
                "activation.k": k,
                "activation.postact_fn": "ReLU",
            }
        )
    return sd


@pytest.mark.parametrize("k,normalize", [(None, None), (5, None), (5, False), (None, True)])
def test_openai_state_dict_matches_reference(tmp_path, k, normalize):
    sd = openai_state_dict(k)
    torch.save(sd, tmp_path / "ae.pt")
    sae = SAE.load(tmp_path / "ae.pt", normalize=normalize)
    implied = k is not None if normalize is None else normalize  # TopK files imply normalize=True
    assert sae.cfg.normalize_activations == ("layer_norm" if implied else "none")
    x = torch.randn(10, 16) * 4 + 1
    rec_ref, lat_ref = openai_reference(sd, x, implied, k)
    rec, lat = sae(x)
    assert torch.allclose(lat, lat_ref, atol=1e-4)
    assert torch.allclose(rec, rec_ref, atol=1e-4)


# ---- errors ---------------------------------------------------------------------------------
def test_missing_path():
    with pytest.raises(FormatError, match="not found"):
        SAE.load("/nonexistent/sae")


def test_missing_weights_and_corrupt_cfg(tmp_path):
    randomized("relu", None).save(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FormatError, match="sae_weights.safetensors is missing"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match="cfg.json is not valid JSON"):
        SAE.load(tmp_path)


def test_truncated_weights(tmp_path):
    randomized("relu", None).save(tmp_path)
    w = tmp_path / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(FormatError, match="sae_weights.safetensors is corrupt or truncated"):
        SAE.load(tmp_path)


def test_wrong_shapes(tmp_path):
    randomized("relu", None).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 25
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"tensor W_enc has shape \(8, 24\), expected \(8, 25\)"):
        SAE.load(tmp_path)


def test_missing_tensor(tmp_path):
    randomized("relu", None).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "jumprelu"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="missing tensors threshold"):
        SAE.load(tmp_path)


def test_unknown_architecture(tmp_path):
    randomized("relu", None).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "mystery"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown SAE architecture 'mystery'"):
        SAE.load(tmp_path)


def test_openai_truncated_and_unsafe(tmp_path):
    torch.save(openai_state_dict(4), tmp_path / "ae.pt")
    data = (tmp_path / "ae.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="cut.pt could not be read"):
        SAE.load(tmp_path / "cut.pt")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"pre_bias": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(FormatError, match="evil.pt could not be read"):
        SAE.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_openai_missing_keys(tmp_path):
    torch.save({"foo": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(FormatError, match="missing pre_bias, latent_bias, encoder.weight"):
        SAE.load(tmp_path / "x.pt")
