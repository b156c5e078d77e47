"""SAELens exports compute what the original SAE computes."""

import pytest
import torch


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_a_scaled_transcoder_exports_to_the_same_outputs(tmp_path, apply_b_dec):
    """Input and output scales differ for a transcoder: wherever b_dec enters the encoder, the SAELens copy (which
    never subtracts it, as SAELens's transcoders do not) computes what the original does."""
    from nanosae import SAE, SAEConfig
    from nanosae.export.saelens import export_saelens

    torch.manual_seed(0)
    tc = SAE(
        SAEConfig(
            d_in=16,
            d_sae=40,
            architecture="relu",
            hook_name="blocks.1.ln2.hook_normalized",
            hook_name_out="blocks.1.hook_mlp_out",
            d_out=16,
            activation_scale=2.5,
            output_scale=1.5,
            apply_b_dec_to_input=apply_b_dec,
        )
    ).eval()
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(std=0.3)
    tc.save(tmp_path / "run" / "sae")
    back = SAE.load(export_saelens(tmp_path / "run", tmp_path / "out"))
    x = torch.randn(50, 16) * 2
    torch.testing.assert_close(back(x)[0], tc(x)[0], rtol=1e-4, atol=1e-4)
