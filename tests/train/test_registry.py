"""A new architecture is one registry entry: a toy defined here alone (in no module of nanosae) trains, saves,
loads, evaluates and exports to SAELens like the built-in ones."""

import pytest
import torch

import nanosae
from nanosae import registry
from nanosae.config import DataConfig
from nanosae.errors import ConfigError
from nanosae.registry import Architecture, LossInputs
from nanosae.sae import SAE


def _half_norm_penalty(sae, b: LossInputs) -> dict[str, torch.Tensor]:
    """L½ on decoder-weighted latents: sparser codes than L1 at the same reconstruction (a toy, not a claim)."""
    return {"l_half": b.coefficient * ((b.z * sae.decoder_norms()) + 1e-6).sqrt().sum(-1).mean()}


TOY = registry.register(
    Architecture(
        "toy_lhalf",
        lambda sae, pre, x_norm, k: pre.relu(),
        loss_terms=_half_norm_penalty,
        sparsity_coefficient=0.5,
        saelens="relu",
    )
)


def test_a_registered_architecture_goes_the_whole_path(planted_store, tmp_path, tiny_model, word_corpus):
    store, _ = planted_store
    cfg = nanosae.TrainConfig.build(
        acts=str(store.path),
        out=str(tmp_path / "run"),
        architecture="toy_lhalf",
        d_sae=64,
        tokens=256 * 40,
        batch_size=256,
        log_every=10,
    )
    result = nanosae.train(cfg)
    assert result.metrics["l_half"] > 0  # the toy's own loss term was trained on
    assert result.metrics["fvu"] < 0.5

    x = store.tokens(0, 500).float()
    loaded = SAE.load(tmp_path / "run" / "sae")
    assert loaded.cfg.architecture == "toy_lhalf" and loaded.arch is TOY
    z = loaded.encode(x)
    assert torch.equal(z, loaded.pre_acts(loaded.normalize_input(x)[0]).relu())  # the toy's activation, as registered

    from nanosae.export.saelens import export_saelens

    exported = SAE.load(export_saelens(tmp_path / "run", tmp_path / "saelens"))  # SAELens runs it as a ReLU SAE
    assert exported.cfg.architecture == "relu"
    assert torch.allclose(exported(x)[0], loaded(x)[0], atol=1e-4)

    # evaluated spliced into a model: a toy SAE of that model's width, trained on nothing, still evaluates
    width = tiny_model.d_model
    toy = SAE(
        nanosae.SAEConfig(d_in=width, d_sae=2 * width, architecture="toy_lhalf", hook_name="blocks.1.hook_resid_post")
    )
    report = nanosae.evaluate(toy, tiny_model, DataConfig(specs=[str(word_corpus)], split="all"), tokens=100)
    assert report["architecture"] == "toy_lhalf" and 0 <= report["l0"] <= 2 * width and report["fvu"] > 0


def test_unknown_and_duplicate_names_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown SAE architecture 'nope'; expected one of relu, topk"):
        nanosae.SAEConfig(d_in=4, d_sae=8, architecture="nope")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(Architecture("topk", lambda sae, pre, x_norm, k: pre))
    assert registry.register(TOY) is TOY  # registering the same entry again is harmless (a module imported twice)
