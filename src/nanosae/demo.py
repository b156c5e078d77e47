"""The whole path in one call, on the embedded defaults: collect -> train -> evaluate -> features -> explain -> steer.

SmolLM2-135M-Instruct (embedded GGUF), blocks.15.hook_resid_post, Python's own docs + standard library as
text, a TopK SAE (d_sae 4608, k 32). Evaluation uses held-out documents (every 20th), which collection
never reads. Each stage writes into the run directory and is skipped when its output is already there,
so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanosae.config import CollectConfig, DataConfig, TrainConfig

StageProgress = Callable[[str, int, int, float], None]  # stage, done, total, seconds


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    quick: bool = False
    """A first look in a few minutes: fewer tokens everywhere."""
    model: str = "smollm2-135m"
    hook: str = "blocks.15.hook_resid_post"
    data: list[str] = field(default_factory=lambda: ["builtin:pydocs", "builtin:stdlib"])
    steer_prompt: str = "The best way to learn Python is"

    def sizes(self) -> dict[str, int]:
        if self.quick:
            return {"collect": 24_576, "train": 98_304, "eval": 3_000, "features": 8_000}
        # three passes over the collection: the CE-loss score keeps rising with passes while FVU stays flat
        # (10k held-out tokens: one 0.967, two 0.975, three 0.9795, five 0.981; README, Benchmarks); three fit 4.5 min
        return {"collect": 200_000, "train": 600_000, "eval": 4_096, "features": 20_000}


def run_demo(cfg: DemoConfig, progress: StageProgress | None = None) -> dict[str, Any]:
    """Run every stage; returns the metrics, five interesting features, a steering example and the seconds
    each stage took in this call (stages already done in an earlier call are skipped and not listed)."""
    from nanosae.io import write_lock

    from nanosae.models import keep_freed_memory

    keep_freed_memory()  # the demo owns its process, as the CLI does (NANOSAE_MALLOC_TUNING=0: off)
    with write_lock(cfg.out):  # a second demo into the same directory is refused while this one runs
        return _run_demo(cfg, progress)


def _run_demo(cfg: DemoConfig, progress: StageProgress | None) -> dict[str, Any]:
    from nanosae.data import ActivationStore, collect
    from nanosae.eval import evaluate
    from nanosae.eval.report import write_report
    from nanosae.interp.explain import explain_n2g
    from nanosae.interp.featuredb import FeatureDB
    from nanosae.interp.features import FeaturesConfig, build_features
    from nanosae.interp.live import Edit, steer
    from nanosae.io import write_json
    from nanosae.models import load_model
    from nanosae.sae import SAE
    from nanosae.train import train

    out, sizes = Path(cfg.out), cfg.sizes()
    say = progress or (lambda *a: None)
    seconds: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    with stage("load model"):
        model = load_model(cfg.model)
    acts = out / "acts"
    with stage("collect"):
        collect(CollectConfig(model=cfg.model, hooks=[cfg.hook], data=DataConfig(specs=cfg.data), tokens=sizes["collect"],
                              out=str(acts)), model=model,
                progress=lambda p: say("collect", p.tokens, p.total, p.seconds))
    if not (out / "sae" / "cfg.json").exists():
        with stage("train"):
            train(TrainConfig.build(out=str(out), acts=str(acts / cfg.hook), tokens=sizes["train"], checkpoint_every=0,
                              log_every=5, resume=True),
                  progress=lambda p: say("train", p.metrics["tokens"], sizes["train"],
                                         p.metrics["tokens"] / max(p.metrics["tokens_per_s"], 1e-9)))
    sae = SAE.load(out / "sae")
    if not (out / "eval.json").exists():
        with stage("evaluate"):
            metrics = evaluate(sae, model, DataConfig(specs=cfg.data, split="eval"), tokens=sizes["eval"],
                               progress=lambda d, t, s: say("eval", d, t, s))
            write_json(out / "eval.json", metrics)
            write_report([metrics], ["demo"], out / "report.html", title="nanosae demo: SmolLM2-135M, blocks.15")
    metrics = json.loads((out / "eval.json").read_text())
    if not (out / "features.db").exists():
        with stage("features"):
            store = ActivationStore(acts / cfg.hook, verify=False)  # older stores have no token ids: run the model
            build_features(sae, model, FeaturesConfig(data=DataConfig(specs=cfg.data, split="train"),
                                                      tokens=sizes["features"]),
                           out / "features.db", acts=store if store.has_ids else None,
                           progress=lambda d, t, s: say("features", d, t, s))
        with stage("explain"):
            explain_n2g(out / "features.db", progress=lambda d, t: say("explain", d, t, 0.0))
    rows = FeatureDB(out).best_explained(5, min_density=0.0005, max_density=0.2)
    features = [{"id": r["id"], "density": r["density"], "explanation": r["explanation"], "score": r["score"],
                 "top_logits": [t for t, _ in json.loads(r["top_logits"])[:5]]} for r in rows]
    steering = None
    if features:
        target = features[0]["id"]
        with stage("steer"):
            base, steered = steer(model, sae, [Edit(target, 2.0 * max(1.0, rows[0]["max_act"]), "add")],
                                  cfg.steer_prompt, max_new_tokens=24)
        steering = {"feature": target, "prompt": cfg.steer_prompt, "baseline": base.text, "steered": steered.text}
    return {"metrics": metrics, "features": features, "steering": steering, "out": str(out), "seconds": seconds}
