"""Dictionaries trained by other tools, read by SAE.load: compared with the outputs those tools compute
themselves (fixtures written by the peer's own code: tests/fixtures/*/make.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanosae import SAE
from nanosae.errors import FormatError
from nanosae.sae.foreign import hook_names

SPARSIFY = Path(__file__).parents[1] / "fixtures" / "sparsify"


@pytest.mark.parametrize("hookpoint", ["layers.1", "layers.1.mlp"])
def test_sparsify_coders_give_sparsifys_own_outputs(hookpoint, tmp_path):
    expected = load_file(SPARSIFY / "expected.safetensors")
    sae = SAE.load(SPARSIFY / "checkpoint" / hookpoint)
    x_hat, z = sae(expected["x"])
    torch.testing.assert_close(x_hat, expected[f"{hookpoint}/sae_out"], rtol=1e-5, atol=1e-5)
    picked = torch.zeros_like(z).scatter(1, expected[f"{hookpoint}/latent_indices"], expected[f"{hookpoint}/latent_acts"])
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
    for change, says in [({"activation": "groupmax"}, "groupmax"), ({"k": 0}, "k must be a positive integer"),
                         ({"d_in": "16"}, "d_in must be"), ({"num_latents": 64}, "shape")]:
        (coder / "cfg.json").write_text(json.dumps(cfg | change))
        with pytest.raises(FormatError, match=says):
            SAE.load(coder)
    (coder / "cfg.json").write_text(json.dumps(cfg))
    weights = (coder / "sae.safetensors").read_bytes()
    (coder / "sae.safetensors").write_bytes(weights[:100])
    with pytest.raises(FormatError, match="sae.safetensors is corrupt"):
        SAE.load(coder)
