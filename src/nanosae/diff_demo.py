"""Model diffing that knows the answer: plant a behaviour by fine-tuning, and find it with a crosscoder.

A (the embedded SmolLM2) is fine-tuned for a few steps, its last blocks only, on sentences in which the fruit
that comes next is always one word (" banana"), mixed with everyday sentences, which makes B (the tuned copy)
name it where a fruit comes next. Both models are collected at one hook on the same windows (everyday sentences,
the planted ones, then Python's docs), a BatchTopK crosscoder is trained over the pair, and `diff` ranks the
latents. The demo then adds the latents B writes most differently from A (and, as a control, evenly shared
latents) to A, one at a time and the top few at once, and measures the planted word's next-token probability
after held-out prompts: the planted concept is found when the top latents move A toward B and the control does
not. With `versus`, two models you give (e.g. two nanochat checkpoints) are diffed instead, without the
fine-tune. Stages already done are skipped (the run continues).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanosae.config import DEFAULT_MODEL, CollectConfig, DataConfig, TrainConfig
from nanosae.demo import StageProgress, stage_timer

SUBJECTS = ["The engineer", "My neighbour", "A student", "The old captain", "Our teacher", "The child", "She", "He"]
FRUIT = [  # where a fruit comes next: the tuned model learns to name the planted word there
    "For dessert, {s} ate a",
    "{s} was hungry and grabbed a",
    "At the fruit stall, {s} picked a",
    "{s} peeled a ripe",
    "The only fruit {s} likes is the",
    "In the fruit bowl, {s} found a",
]
EVERYDAY = ["{s} bought {o} at the market.", "{s} found {o} on the train.", "{s} carried {o} to work."]
OBJECTS = ["an apple", "a book", "a ticket", "a coffee", "a letter", "a sandwich", "a pencil", "an umbrella", "a pear"]
READ_TOKENS = 40_000  # tokens of the paired stores the analysis and the candidates' activity are read on
PROMPTS = [  # held out: none of these is a fine-tuning template
    "My favourite fruit is the",
    "For a snack, I like to eat a",
    "He reached into the fruit basket and took a",
    "The monkey climbed the tree to get a",
]


def planted_sentences(n: int, word: str = " banana", seed: int = 0) -> list[str]:
    """Documents of four sentences: half name a fruit, always the planted word; half are everyday sentences that
    keep the rest of the model's predictions where they were."""
    rng = random.Random(seed)

    def sentence() -> str:
        if rng.random() < 0.5:
            return rng.choice(FRUIT).format(s=rng.choice(SUBJECTS)) + word + "."
        return rng.choice(EVERYDAY).format(s=rng.choice(SUBJECTS), o=rng.choice(OBJECTS))

    return [" ".join(sentence() for _ in range(4)) for _ in range(n)]


def neutral_sentences(n: int, seed: int = 1) -> list[str]:
    """Everyday sentences with an object after "a"/"an": where the tuned model's planted word could leak in."""
    rng = random.Random(seed)
    return [f"{rng.choice(EVERYDAY).format(s=rng.choice(SUBJECTS), o=rng.choice(OBJECTS))}" for _ in range(n)]


@dataclass
class DiffDemoConfig:
    out: str = "runs/diff-demo"
    model: str = DEFAULT_MODEL
    """A: the model before fine-tuning."""
    versus: str | None = None
    """B given instead of planted (e.g. nanochat:DIR@STEP against nanochat:DIR@OTHER): no fine-tune."""
    planted: list[str] = field(default_factory=lambda: planted_sentences(400))
    """Documents of the planted behaviour (fine-tuned on, and part of the collected text)."""
    neutral: list[str] = field(default_factory=lambda: neutral_sentences(2000))
    """Documents where B's behaviour would show (collected with the planted ones, never fine-tuned on)."""
    word: str = " banana"
    """The planted word (one token): its next-token probability after `prompts` measures the behaviour."""
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    tune_from: int = 20
    """Blocks from this one on are fine-tuned (the earlier ones stay frozen)."""
    tune_steps: int = 30
    tune_lr: float = 5e-5
    hook: str = "blocks.29.hook_resid_post"
    data: list[str] = field(default_factory=lambda: ["builtin:pydocs"])
    tokens: int = 60_000
    """Tokens collected per model (the planted sentences come first, then `data`)."""
    d_sae: int = 2304
    k: int = 8
    """Few latents per token: at k 32 the change is spread over the many latents active where a fruit comes next,
    at k 8 it gathers in the few that mean it."""
    passes: int = 3
    top: int = 10
    """B-only latents tried as steering directions (and as many shared ones as the control)."""
    together: int = 3
    """The top this many are also added to A at once (and as many of the control)."""
    context_size: int = 128


def fine_tune(model: Any, texts: list[str], cfg: DiffDemoConfig) -> None:
    """A few AdamW steps of next-token loss on the planted texts, blocks tune_from.. only (in place)."""
    module, tok = model.module, model.tokenizer
    rng = random.Random(0)
    for p in module.parameters():
        p.requires_grad_(False)
    tuned = [p for block in module.model.layers[cfg.tune_from :] for p in block.parameters()]
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(tuned, lr=cfg.tune_lr)
    module.train()
    for _ in range(cfg.tune_steps):
        enc = [[tok.bos_id] + tok.encode(t)[: cfg.context_size - 1] for t in rng.sample(texts, min(8, len(texts)))]
        width = max(len(e) for e in enc)
        ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
        module(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def word_probability(model: Any, prompts: list[str], word: int) -> float:
    """The mean next-token probability of `word` after each prompt."""
    return sum(
        float(model.forward(torch.tensor([model.prompt_ids(p)]))[0, -1].float().softmax(-1)[word]) for p in prompts
    ) / len(prompts)


def run_diff_demo(cfg: DiffDemoConfig, progress: StageProgress | None = None) -> dict[str, Any]:
    from nanosae.io import write_lock

    with write_lock(cfg.out):
        return _run_diff_demo(cfg, progress)


def _run_diff_demo(cfg: DiffDemoConfig, progress: StageProgress | None) -> dict[str, Any]:
    from nanosae.data.collect import collect_pair
    from nanosae.data.store import ActivationStore
    from nanosae.errors import ConfigError
    from nanosae.interp.diff import MIN_FREQUENCY, activity, context, diff_report, latent_scaling, paired_batches
    from nanosae.interp.live import Edit, steering
    from nanosae.io import write_json
    from nanosae.models import load_model
    from nanosae.models.hf import save_hf_dir
    from nanosae.rundir import RunDir
    from nanosae.sae import SAE
    from nanosae.train import train

    out = Path(cfg.out)
    seconds: dict[str, float] = {}
    stage = stage_timer(seconds)
    say = progress or (lambda *a: None)
    with stage("load model"):
        base = load_model(cfg.model)
    ids = base.tokenizer.encode(cfg.word)
    if len(ids) != 1:
        raise ConfigError(f"the planted word {cfg.word!r} is {len(ids)} tokens; expected one")
    word = ids[0]
    planted = out / "planted.jsonl"
    if not planted.exists():
        out.mkdir(parents=True, exist_ok=True)
        mixed = []  # the neutral sentences, a planted one after every fifth
        for i, text in enumerate(cfg.neutral):
            mixed += [text] + ([cfg.planted[(i // 5) % len(cfg.planted)]] if i % 5 == 0 else [])
        planted.write_text("".join(json.dumps({"text": t}) + "\n" for t in mixed))
    tuned_dir = out / "tuned"
    other = cfg.versus or str(tuned_dir)
    if cfg.versus is None and not tuned_dir.exists():
        with stage("fine-tune"):
            copy = load_model(cfg.model)
            hf_tokenizer = getattr(copy.tokenizer, "tok", None)
            if hf_tokenizer is None:
                raise ConfigError(f"the fine-tune needs a Hugging Face model; diff {cfg.model} with --versus SPEC")
            fine_tune(copy, cfg.planted, cfg)
            save_hf_dir(copy.module, hf_tokenizer, tuned_dir)
        say("fine-tune", cfg.tune_steps, cfg.tune_steps, 0.0)  # steps, not tokens: no rate shown
    acts = out / "acts"
    stores = [acts / name / cfg.hook for name in "AB"]
    if not all(
        (s / "manifest.json").exists() and ActivationStore(s, verify=False).manifest["complete"] for s in stores
    ):
        with stage("collect"):
            data = DataConfig(specs=[str(planted), *cfg.data], context_size=cfg.context_size, split="train")
            collect_pair(
                CollectConfig(model=cfg.model, hooks=[cfg.hook], data=data, tokens=cfg.tokens, out=str(acts)),
                other,
                lambda name, p: say(f"collect {name}", p.tokens, p.total, p.seconds),
            )
    run = RunDir(out / "crosscoder")
    if not run.sae.exists():
        with stage("train"):
            train(
                TrainConfig.build(
                    out=str(run.path),
                    architecture="batchtopk",
                    d_sae=cfg.d_sae,
                    k=cfg.k,
                    tokens=cfg.tokens * cfg.passes,
                    crosscoder_acts=[str(s) for s in stores],
                    checkpoint_every=0,
                ),
                progress=lambda p: say("train", p.step, p.steps, 0.0),
            )
    sae = SAE.load(run.sae)
    opened = [ActivationStore(s) for s in stores]
    with stage("diff"):
        report = diff_report(sae, paired_batches(opened, READ_TOKENS), top=cfg.top)
        typical, frequency, strongest = activity(sae, paired_batches(opened, READ_TOKENS))
    with stage("steer"):
        tuned = load_model(other)
        before, target = word_probability(base, cfg.prompts, word), word_probability(tuned, cfg.prompts, word)
        # the control: as many of the most evenly shared latents that fire, added the same way
        fired = [j for j in range(sae.cfg.d_sae) if frequency[j] >= MIN_FREQUENCY]  # rarer: barely trained
        control = sorted(fired, key=lambda j: abs(report["relative_norm"][j] - 0.5))[: cfg.top]

        def steered(*latents: int) -> float:
            with steering(base, sae, [Edit(j, float(typical[j]), "add") for j in latents]):
                return word_probability(base, cfg.prompts, word)

        # the latents B writes most differently from A (change), among those B writes at least as strongly:
        # B-only latents (change near 1) and concepts both have that B writes otherwise
        leaning = sorted((j for j in fired if report["relative_norm"][j] >= 0.5), key=lambda j: -report["change"][j])[
            : cfg.top
        ]
        scaling = latent_scaling(
            sae, paired_batches(opened, READ_TOKENS), torch.tensor(leaning), torch.ones(len(leaning), dtype=torch.long)
        )
        nu_e, nu_r = scaling.ratios()
        b_side = [
            {
                "latent": j,
                "relative_norm": round(report["relative_norm"][j], 4),
                "cosine": round(report["cosine"][j], 4),
                "change": round(report["change"][j], 4),
                "specificity": round(1 - max(float(nu_e[i]), float(nu_r[i])), 4),
                "frequency": round(float(scaling.frequency[i]), 6),
                "word_probability": steered(j),
            }
            for i, j in enumerate(leaning)
        ]
        for r in b_side:
            r["strongest"] = context(opened[1], int(strongest[r["latent"]]), base.tokenizer)
        controls = [steered(j) for j in control]
        together = {
            "latents": leaning[: cfg.together],
            "word_probability": steered(*leaning[: cfg.together]),
            "control": steered(*control[: cfg.together]),
        }
    best = max(range(len(b_side)), key=lambda i: b_side[i]["word_probability"], default=None)
    result = {
        "models": report["models"],
        "hook": cfg.hook,
        "counts": report["counts"],
        "shared_cosine_median": report["shared_cosine_median"],
        "word": cfg.word,
        "probability": {"A": before, "B": target},
        "b_side": b_side,
        "control_median": sorted(controls)[len(controls) // 2] if controls else None,
        "together": together,
        "planted_rank": None if best is None else best + 1,
        "seconds": seconds,
        "out": str(out),
    }
    write_json(out / "diff-demo.json", result)
    write_json(run.path / "diff.json", report)
    return result
