"""The whole path in one call, on the embedded defaults: collect -> train -> evaluate -> features -> explain -> steer.

SmolLM2-135M-Instruct (embedded GGUF), blocks.15.hook_resid_post, Python's own docs + standard library as
text, a TopK SAE (d_sae 4608, k 32). Evaluation uses held-out documents (every 20th), which collection
never reads. Each stage writes into the run directory and is skipped when its output is already there,
so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanosae.config import DEFAULT_MODEL, DENSE_THRESHOLD, CollectConfig, DataConfig, TrainConfig

StageProgress = Callable[[str, int, int, float], None]  # stage, done, total, seconds


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    """Where the demo writes (an interrupted demo continues)."""
    quick: bool = False
    """A first look in a few minutes (fewer tokens everywhere)."""
    model: str = DEFAULT_MODEL
    """The host model."""
    hook: str = "blocks.15.hook_resid_post"
    """Where the SAE reads the model."""
    data: list[str] = field(default_factory=lambda: ["builtin:pydocs", "builtin:stdlib"])
    """The text (repeatable): collected, evaluated on (every 20th document) and explained with."""
    steer_prompt: str = "The best way to learn Python is"
    """The prompt the steering example continues."""

    def sizes(self) -> dict[str, int]:
        if self.quick:
            return {"collect": 24_576, "train": 98_304, "eval": 3_000, "features": 24_576}
        # three passes over the collection: the CE-loss score keeps rising with passes while FVU stays flat, and
        # three fit the demo's time (docs/benchmarks.md, "Training passes")
        return {"collect": 200_000, "train": 600_000, "eval": 4_096, "features": 200_000}  # features: the whole store


def stage_timer(seconds: dict[str, float]) -> Callable[[str], Any]:
    """A context manager per stage name that adds the stage's wall time to seconds[name]."""

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    return stage


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
    from nanosae.io import read_json, write_json
    from nanosae.models import load_model
    from nanosae.rundir import RunDir
    from nanosae.sae import SAE
    from nanosae.train import train

    out, sizes = Path(cfg.out), cfg.sizes()
    run = RunDir(out)
    say = progress or (lambda *a: None)
    seconds: dict[str, float] = {}
    stage = stage_timer(seconds)

    with stage("load model"):
        model = load_model(cfg.model)
    acts = out / "acts"
    with stage("collect"):
        collect(
            CollectConfig(
                model=cfg.model,
                hooks=[cfg.hook],
                data=DataConfig(specs=cfg.data),
                tokens=sizes["collect"],
                out=str(acts),
            ),
            model=model,
            progress=lambda p: say("collect", p.tokens, p.total, p.seconds),
        )
    if not (run.sae / "cfg.json").exists():
        with stage("train"):
            train(
                TrainConfig.build(
                    out=str(out),
                    acts=str(acts / cfg.hook),
                    tokens=sizes["train"],
                    checkpoint_every=0,
                    log_every=5,
                    resume=True,
                ),
                progress=lambda p: say(
                    "train",
                    int(p.metrics["tokens"]),
                    sizes["train"],
                    p.metrics["tokens"] / max(p.metrics["tokens_per_s"], 1e-9),
                ),
            )
    sae = SAE.load(run.sae)
    if not run.eval.exists():
        with stage("evaluate"):
            metrics = evaluate(
                sae,
                model,
                DataConfig(specs=cfg.data, split="eval"),
                tokens=sizes["eval"],
                progress=lambda d, t, s: say("eval", d, t, s),
            )
            write_json(run.eval, metrics)
            write_report([metrics], ["demo"], run.report, title="nanosae demo: SmolLM2-135M, blocks.15")
    metrics = read_json(run.eval)
    if not run.features.exists():
        with stage("features"):
            store = ActivationStore(acts / cfg.hook, verify=False)  # older stores have no token ids: run the model
            build_features(
                sae,
                model,
                FeaturesConfig(data=DataConfig(specs=cfg.data, split="train"), tokens=sizes["features"]),
                run.features,
                acts=store if store.has_ids else None,
                progress=lambda d, t, s: say("features", d, t, s),
            )
        with stage("explain"):
            explain_n2g(run.features, progress=lambda d, t: say("explain", d, t, 0.0))
    db = FeatureDB(out)
    features = interesting_features(db, 5)
    with stage("effects"):  # what each feature does to the output, measured (not its logit lens)
        from nanosae.interp.effects import effect_summary

        for f in features:
            f["effect"] = effect_summary(model, sae, db, f["id"])
    steering = None
    if features:
        with stage("steer"):  # from more candidates than the five shown: the first that steers and still reads
            steering = steering_example(model, sae, db, interesting_features(db, 20), cfg.steer_prompt)
    return {"metrics": metrics, "features": features, "steering": steering, "out": str(out), "seconds": seconds}


def leading_token(explanation: str) -> str:
    """The first quoted token of an N2G explanation, trimmed and lower-cased ('" Self" | "x"' -> 'self')."""
    match = re.search(r'"(.*?)"', explanation)
    return (match.group(1) if match else explanation).strip().lower()


def interesting_features(db: Any, n: int) -> list[dict[str, Any]]:
    """Features a researcher would look at first: enough evidence (≥ 50 firings), an explanation that says
    something (a word of three letters or more, no special tokens), each leading token once (a dictionary
    splits a frequent token like " self" into several features; five of them would show one thing), not dense
    or position-like (density ≤ 5%), best detection score first, then most evidence."""
    rows = db.explained(min_fires=50, max_density=DENSE_THRESHOLD)
    out, seen = [], set()
    for r in rows:
        text = r["explanation"]
        lead = leading_token(text)
        if lead in seen or "<|" in text or not re.search(r"[A-Za-z]{3}", text):
            continue
        seen.add(lead)
        out.append(
            {
                "id": r["id"],
                "density": r["density"],
                "fires": r["fires"],
                "max_act": r["max_act"],
                "explanation": text,
                "score": r["score"],
                "interval": (r["score_low"], r["score_high"]),
                "windows": (r["n_active"], r["n_silent"]),
                "top_logits": [t for t, _ in db.cell(r["top_logits"], "top_logits")[:5]],
            }
        )
        if len(out) == n:
            break
    return out


FLUENCY_MARGIN = 2.0  # nats per token a steered continuation may lose, under the unsteered model, and still read
DISTINCT = 0.5  # and at least this share of its tokens distinct: a model copies its own loops with confidence


def fluency(model: Any, prompt: str, tokens: list[int]) -> float:
    """How natural a continuation is to the unsteered model: its mean log-probability per token, and half of it
    again for every repeated token (a steered model that says "self.self.self" is not fluent)."""
    import torch

    if not tokens:
        return 0.0
    ids = model.prompt_ids(prompt)
    logits = model.forward(torch.tensor([ids + tokens]))[0, len(ids) - 1 : -1].float()
    mean = float(logits.log_softmax(-1)[torch.arange(len(tokens)), torch.tensor(tokens)].mean())
    return mean - 0.5 * abs(mean) * (1 - len(set(tokens)) / len(tokens))


def steering_example(
    model: Any, sae: Any, db: Any, features: list[dict[str, Any]], prompt: str
) -> dict[str, Any] | None:
    """Steer with a feature whose effect is clear and whose steered text still reads: adding its direction (in
    units of its largest activation, ½-8×) should raise the next-token probability of the tokens it fires on
    tenfold, while the steered continuation stays within FLUENCY_MARGIN nats per token of the baseline's
    fluency under the unsteered model. The first feature and smallest strength that do both are used (or the
    strongest effect tried, said to be disfluent); both continuations and probabilities are reported."""
    from nanosae.interp.live import Edit, next_token_probability, steer

    best, fluent = None, None
    baseline = None
    for feature in features:
        tokens = db.focus_tokens(feature["id"])
        ids = sorted({encoded[0] for encoded in map(model.tokenizer.encode, tokens) if encoded})
        before = next_token_probability(model, sae, [], prompt, ids)
        for multiple in (0.5, 1, 2, 4, 8):
            edit = Edit(feature["id"], multiple * max(1.0, feature["max_act"]), "add")
            after = next_token_probability(model, sae, [edit], prompt, ids)
            gain = after / max(before, 1e-12)
            if best is None or gain > best[0]:
                best = (gain, feature, edit, tokens, before, after)
            if gain >= 10 and after >= 0.01:
                base, steered = steer(model, sae, [edit], prompt, max_new_tokens=24)
                baseline = baseline if baseline is not None else fluency(model, prompt, base.tokens)
                varied = len(set(steered.tokens)) >= DISTINCT * max(1, len(steered.tokens))
                if varied and fluency(model, prompt, steered.tokens) >= baseline - FLUENCY_MARGIN:
                    fluent = (gain, feature, edit, tokens, before, after)
                break
        if fluent is not None:
            break
    chosen = fluent or best
    if chosen is None:
        return None
    _, feature, edit, tokens, before, after = chosen
    base, steered = steer(model, sae, [edit], prompt, max_new_tokens=24)
    return {
        "feature": feature["id"],
        "explanation": feature["explanation"],
        "prompt": prompt,
        "strength": edit.value,
        "baseline": base.text,
        "steered": steered.text,
        "fluent": fluent is not None,
        "tokens": tokens,
        "probability_before": before,
        "probability_after": after,
    }


# ---- the second demo: circuits ----------------------------------------------------------------------------------
CIRCUIT_PROMPT = "import os\n\nfor name in os.listdir(path):\n    full = os.path.join(path, name"


@dataclass
class CircuitsDemoConfig:
    out: str = "runs/demo-circuits"
    model: str = DEFAULT_MODEL
    data: list[str] = field(default_factory=lambda: ["builtin:pydocs", "builtin:stdlib"])
    prompt: str = CIRCUIT_PROMPT
    """Traced: what drives the model to close the call's bracket."""
    tokens: int = 80_000
    """Training tokens, streamed once through the model for every transcoder at once (the forward pass and 30
    transcoders' steps run at ~175 tokens/s on 2 cores)."""
    d_sae: int = 2048
    k: int = 16
    batch_size: int = 512
    """Larger than the budget's default (128): thirty transcoders step together, so fewer, larger steps."""
    feature_tokens: int = 4096
    """Tokens read for each layer's feature database."""
    max_feature_nodes: int = 512
    context_size: int = 256
    """Token window of training, scoring and feature databases."""


def run_circuits_demo(cfg: CircuitsDemoConfig, progress: StageProgress | None = None) -> dict[str, Any]:
    """Transcoders for every layer from one stream, their replacement scores, a feature database with N2G
    explanations per layer, and one traced prompt; stages already done are skipped (the run continues)."""
    from nanosae.io import write_lock
    from nanosae.models import keep_freed_memory

    keep_freed_memory()
    with write_lock(cfg.out):
        return _run_circuits_demo(cfg, progress)


def _run_circuits_demo(cfg: CircuitsDemoConfig, progress: StageProgress | None) -> dict[str, Any]:
    from nanosae.config import TraceConfig
    from nanosae.interp import transcoder_sets as sets
    from nanosae.interp.circuits import load_transcoders, strongest_paths
    from nanosae.interp.explain import explain_n2g
    from nanosae.interp.features import FeaturesConfig, build_features
    from nanosae.io import read_json
    from nanosae.models import load_model
    from nanosae.rundir import TranscoderSetDir
    from nanosae.train.sweep import transcoder_set

    out = Path(cfg.out)
    tset = TranscoderSetDir(out)
    say = progress or (lambda *a: None)
    seconds: dict[str, float] = {}
    stage = stage_timer(seconds)
    data = lambda split: DataConfig(specs=cfg.data, split=split, context_size=cfg.context_size)

    with stage("load model"):
        model = load_model(cfg.model)
    layers = list(range(model.n_layers))
    if not tset.exists():
        with stage("train"):
            cfgs = transcoder_set(
                {
                    "model": cfg.model,
                    "data": data("train"),
                    "d_sae": cfg.d_sae,
                    "k": cfg.k,
                    "batch_size": cfg.batch_size,
                    "tokens": cfg.tokens,
                    "checkpoint_every": 0,
                    "log_every": 5,
                    "resume": True,
                    "out": str(out),
                },
                layers,
            )
            sets.train_set(
                cfgs,
                layers,
                model=model,
                progress=lambda p: say(
                    "train", p.metrics["tokens"], cfg.tokens, p.metrics["tokens"] / max(p.metrics["tokens_per_s"], 1e-9)
                ),
            )
    if not tset.replacement.exists():  # stopped between training and scoring
        with stage("score"):
            sets.score_set(out, data("eval"), model)
    scores = sets.read_scores(out)
    _, tcs = load_transcoders(out)
    with stage("features"):
        for L, run in tset.layer_runs().items():
            db = run / "features.db"
            if not db.exists():
                build_features(tcs[L], model, FeaturesConfig(data=data("train"), tokens=cfg.feature_tokens), db)
                explain_n2g(db)
            say("features", L + 1, len(layers), seconds.get("features", 0.0))
    graph_file = tset.graph("demo")
    if not graph_file.exists():
        with stage("trace"):
            sets.trace(
                cfg.prompt,
                TraceConfig(transcoders=str(out), max_feature_nodes=cfg.max_feature_nodes),
                model=model,
                slug="demo",
                progress=lambda d, t: say("trace", d, t, 0.0),
            )
    data = read_json(graph_file)
    return {
        "out": str(out),
        "scores": scores,
        "graph": str(graph_file),
        "info": data["metadata"]["info"],
        "top_logits": [n["clerp"] for n in data["nodes"] if n["feature_type"] == "logit"],
        "paths": strongest_paths(data, 5),
        "seconds": seconds,
    }
