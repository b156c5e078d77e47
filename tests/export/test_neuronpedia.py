import json

import pytest
import torch
from safetensors.torch import load_file

from nanosae import SAE, SAEConfig
from nanosae.export.neuronpedia import export_neuronpedia
from nanosae.export.saelens import export_saelens

FEATURE_KEYS = {
    "feature_index",
    "neg_str",
    "neg_values",
    "pos_str",
    "pos_values",
    "frac_nonzero",
    "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights",
    "correlated_features_indices",
    "activations",
    "n_prompts_total",
    "n_tokens_in_prompt",
    "dataset",
    "logits_hist_data_bar_heights",
    "decoder_weights_dist",
}


def test_saelens_export_round_trip(viewer_run, tmp_path):
    out = export_saelens(viewer_run, tmp_path / "saelens")
    original, loaded = SAE.load(viewer_run / "sae"), SAE.load(out)
    assert loaded.cfg == original.cfg
    for name, t in original.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name])
    sparsity = load_file(out / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (24,) and float(sparsity.max()) <= 0  # log10 densities


def test_batchtopk_exports_as_jumprelu(tmp_path):
    sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="batchtopk", k=4, hook_name="blocks.0.hook_resid_post"))
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    sae.save(tmp_path / "run" / "sae")
    out = export_saelens(tmp_path / "run", tmp_path / "out")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    exported = SAE.load(out)
    x = torch.randn(16, 8)
    sae.eval()
    assert torch.allclose(exported.encode(x), sae.encode(x))


def test_neuronpedia_files_have_the_documented_structure(viewer_run, tmp_path):
    out = export_neuronpedia(viewer_run, tmp_path / "np", batch=10)
    batches = sorted(out.glob("batch-*.json"))
    assert [p.name for p in batches] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    indices = []
    for p in batches:
        b = json.loads(p.read_text())
        assert set(b) == {"model_id", "layer", "sae_set", "features"} and b["layer"] == 1
        for f in b["features"]:
            assert FEATURE_KEYS <= set(f)
            indices.append(f["feature_index"])
            assert len(f["pos_str"]) == len(f["pos_values"]) == 10 and len(f["neg_str"]) == len(f["neg_values"])
            assert len(f["freq_hist_data_bar_values"]) == len(f["freq_hist_data_bar_heights"])
            assert 0 <= f["frac_nonzero"] <= 1
            for a in f["activations"]:
                assert set(a) == {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}
                assert len(a["tokens"]) == len(a["values"]) and 0 <= a["qualifying_token_index"] < len(a["tokens"])
            tops = [a for a in f["activations"] if a["bin_min"] == -1]
            assert all(a["bin_contains"] == -1 for a in tops)
    assert indices == list(range(24))
    expl = json.loads((out / "explanations.json").read_text())
    assert any(e["index"] == 3 for e in expl)
    assert (out / "sae" / "cfg.json").exists() and "Upload steps" in (out / "README.md").read_text()


def test_export_without_features_db_says_which_command(tmp_path):
    SAE(SAEConfig(d_in=8, d_sae=16, architecture="relu")).save(tmp_path / "run" / "sae")
    with pytest.raises(Exception, match="nanosae features"):
        export_neuronpedia(tmp_path / "run", tmp_path / "out")
