"""What a feature does to the model's output, measured: ablate it where it fires and see the next-token
distribution change, rather than read W_dec·W_U (the logit lens), which says what the direction would do
at the unembedding if nothing in between acted on it.

For each of a feature's top examples (its token window, BOS first), the model runs twice: as it is, and with
the latent clamped to 0 where the SAE writes (the SAE's reconstruction error kept, so only the latent's own
contribution is removed). At every position where the latent is active (≥ 25% of its max) the change of the
next-token log-probabilities is taken; the feature's measured effect is the mean over those positions of
clean − ablated, per vocabulary token: what the feature adds to the prediction where it fires. The logit
lens stays beside it, labelled, with its agreement: the overlap of the two top-10 lists and their correlation
over the whole vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from nanosae.interp.explain import ACTIVE_FRACTION
from nanosae.interp.featuredb import FeatureDB
from nanosae.interp.features import lens_parts
from nanosae.interp.live import Edit, steering
from nanosae.models import HostModel
from nanosae.sae import SAE

TOP = 10


class Effect(NamedTuple):
    mean: Tensor
    """(vocab,) mean over the active positions of log p(token | clean) − log p(token | ablated)."""
    positions: int
    windows: int


@torch.no_grad()
def measured_effect(model: HostModel, sae: SAE, latent: int, windows: list[list[int]], max_act: float) -> Effect | None:
    """The latent's mean effect on the next-token log-probabilities where it fires in these token windows
    (None when it fires in none of them when they are run again: a window's own left context is shorter)."""
    hooks = sae.cfg.input_hooks
    total, positions, used = None, 0, 0
    for ids in windows:
        tokens = torch.tensor([[model.tokenizer.bos_id, *[i for i in ids if i >= 0]]], device=model.device)
        logits, cache = model.run_with_cache(tokens, hooks)
        z = sae.encode(sae.gather_input(cache))[0, :, latent]
        where = (z >= ACTIVE_FRACTION * max_act).nonzero().squeeze(1)
        where = where[where > 0]  # never BOS
        if not len(where):
            continue
        with steering(model, sae, [Edit(latent, 0.0, "clamp")]):
            ablated = model.forward(tokens)
        change = logits[0, where].float().log_softmax(-1) - ablated[0, where].float().log_softmax(-1)
        total = change.sum(0) if total is None else total + change.sum(0)
        positions, used = positions + len(where), used + 1
    return None if total is None else Effect(total / positions, positions, used)


def effect_summary(model: HostModel, sae: SAE, db: FeatureDB, latent: int, n_windows: int = 8) -> dict[str, Any]:
    """The measured effect of a latent from its top examples, its top promoted and suppressed tokens, and the
    logit lens beside it with their agreement; or a note saying why there is none."""
    row = db.latent(latent)
    examples = [e for e in db.examples(latent) if e["kind"] == "top"][:n_windows]
    if row is None or not examples:
        return {"note": "no examples of this feature to run"}
    if "ids" not in examples[0].keys() or examples[0]["ids"] is None:
        return {"note": "this features.db predates stored token ids: rebuild it (nanosae features) to measure effects"}
    effect = measured_effect(model, sae, latent, [db.cell(e["ids"], "example ids") for e in examples], row["max_act"])
    if effect is None:
        return {"note": "it does not fire in its examples' windows when they are run on their own"}
    decode = lambda i: model.tokenizer.decode([int(i)])
    up, down = effect.mean.topk(TOP), (-effect.mean).topk(TOP)
    out: dict[str, Any] = {
        "promoted": [[decode(i), round(float(v), 4)] for v, i in zip(up.values, up.indices)],
        "suppressed": [[decode(i), round(-float(v), 4)] for v, i in zip(down.values, down.indices)],
        "positions": effect.positions,
        "windows": effect.windows,
    }
    parts = lens_parts(model, sae, [latent])
    if parts is not None:
        lens = (parts[0] @ parts[1])[0]
        vocab = min(len(lens), len(effect.mean))
        lens, measured = lens[:vocab], effect.mean[:vocab]
        overlap = len(set(lens.topk(TOP).indices.tolist()) & set(measured.topk(TOP).indices.tolist()))
        out["lens_top_overlap"] = overlap
        out["lens_correlation"] = round(float(torch.corrcoef(torch.stack([lens, measured]))[0, 1]), 4)
    return out
