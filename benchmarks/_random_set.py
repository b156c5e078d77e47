"""A random JumpReLU transcoder per layer of a host model, written in circuit-tracer's layout (which nanosae and
circuit-tracer both read): for benchmarks whose cost depends on how many features fire, not on what they mean."""

from __future__ import annotations

from pathlib import Path

import torch

# the calibration text of smollm2_set: other text than the benchmarks' prompts, so no pre-activation of a prompt
# sits exactly on a threshold
CALIBRATION = (
    "Rivers run from the mountains to the sea, and the towns along them grew where boats could stop. "
    "def mean(values):\n    return sum(values) / len(values)\n"
)


def random_set(
    out: Path, model, calibration: list[int], d_sae: int, l0: float, scan: str, dec_std: float = 0.02
) -> None:
    """Each layer's threshold is the quantile of its pre-activations on the calibration tokens (BOS left out, as
    both tools leave it out) that leaves about l0 features active per token."""
    import yaml
    from safetensors.torch import save_file

    hooks = [f"blocks.{L}.ln2.hook_normalized" for L in range(model.n_layers)]
    _, cache = model.run_with_cache(torch.tensor([calibration]), hooks)
    d = model.d_model
    out.mkdir(parents=True)
    for L, hook in enumerate(hooks):
        W_enc = torch.randn(d_sae, d) / d**0.5
        pre = cache[hook][0, 1:].float() @ W_enc.T
        tensors = {
            "W_enc": W_enc,
            "b_enc": torch.zeros(d_sae),
            "W_dec": torch.randn(d_sae, d) * dec_std,
            "b_dec": torch.zeros(d),
            "activation_function.threshold": pre.flatten().quantile(1 - l0 / d_sae).expand(d_sae).clone(),
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"layer_{L}.safetensors"))
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config | {"scan": scan, "model_name": model.name}))


def smollm2_set(out: Path, d_sae: int, l0: float, seed: int = 0) -> None:
    """random_set for the embedded SmolLM2-135M, calibrated on CALIBRATION."""
    from nanosae.models import load_model

    torch.manual_seed(seed)
    model = load_model("smollm2-135m")
    random_set(out, model, model.prompt_ids(CALIBRATION), d_sae, l0, scan="random-smollm2")
