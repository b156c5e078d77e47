"""Quality at equal budget: every trainer on the same stored activations for the same number of tokens.

A job is a hook and a corpus (SmolLM2-135M, embedded): `--tokens` are collected (or read from `--acts`), every
trainer reads them `--passes` times (TopK d_sae 4608, k 32 unless told otherwise), and every SAE is evaluated on
the same held-out tokens in one shared clean pass (the corpus's eval split: every 20th document; BOS excluded):
FVU, CE-loss score, KL, L0, latents dead in training and never firing in evaluation, train seconds.

Trainers: nanosae's defaults as TopK, BatchTopK and Matryoshka (same L0), nanosae with a KL fine-tune phase, and,
when installed in this venv (`make bench` puts them in .venv-bench), sparsify at its usual 4096-token batches and
at nanosae's batch size, dictionary_learning and SAELens with their defaults. `--only` picks some of them;
`--variant JSON` adds nanosae TrainConfig variants (flat settings, e.g. '{"name": "lr2x", "lr": 0.001}').

The three jobs of docs/benchmarks.md (200k collected tokens, three passes each):
  python benchmarks/quality.py --job demo        # blocks.15.hook_resid_post, builtin:pydocs + builtin:stdlib
  python benchmarks/quality.py --job stdlib5     # blocks.5.hook_resid_post, builtin:stdlib
  python benchmarks/quality.py --job pydocs25    # blocks.25.hook_resid_post, Python docs (paragraphs as documents)
or any other: --hook H --data SPEC [--data SPEC] --tokens 200k --passes 3 [--acts STORE] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _results import save

from nanosae import SAE, ActivationStore, CollectConfig, DataConfig, SAEConfig, TrainConfig
from nanosae.data import collect
from nanosae.eval import evaluate
from nanosae.models import keep_freed_memory, load_model
from nanosae.options import parse_count
from nanosae.train import train

PEER_BATCH = 4096
JOBS = {
    "demo": ("blocks.15.hook_resid_post", ["builtin:pydocs", "builtin:stdlib"]),
    "stdlib5": ("blocks.5.hook_resid_post", ["builtin:stdlib"]),
    "pydocs25": ("blocks.25.hook_resid_post", ["pydocs-paragraphs"]),
}


def job_data(specs: list[str], out: Path) -> DataConfig:
    """The corpus of a job. "pydocs-paragraphs": Python's documentation with each paragraph a document. Its
    topics are few and long, so holding out every 20th topic leaves ~1k tokens; every 20th paragraph leaves ~5%."""
    if specs != ["pydocs-paragraphs"]:
        return DataConfig(specs=specs)
    from nanosae.data.corpus import iter_documents

    path = out / "pydocs.txt"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "\n\n".join(iter_documents(DataConfig(specs=["builtin:pydocs"], split="all"))), encoding="utf-8"
        )
    return DataConfig(specs=[str(path)], txt_paragraphs=True)


@dataclass
class Job:
    hook: str
    data: DataConfig
    tokens: int = 200_000
    passes: int = 3
    d_sae: int = 4608
    k: int = 32
    store: ActivationStore = field(default=None, repr=False)  # type: ignore[assignment]

    @property
    def budget(self) -> int:
        """Training tokens every trainer gets."""
        return self.passes * len(self.store)

    def batches(self, batch_size: int, seed: int = 0):
        """The stored activations, shuffled, `passes` times over (fp32); every peer reads the same ones."""
        return self.store.batches(batch_size, shuffle=True, seed=seed, epochs=self.passes)


def as_topk_sae(job: Job, W_enc, b_enc, W_dec, b_dec, centred: bool) -> SAE:
    sae = SAE(
        SAEConfig(
            d_in=W_enc.shape[0],
            d_sae=W_enc.shape[1],
            architecture="topk",
            k=job.k,
            hook_name=job.hook,
            apply_b_dec_to_input=centred,
        )
    )
    sae.load_state_dict(
        {
            "W_enc": W_enc.detach().float(),
            "b_enc": b_enc.detach().float(),
            "W_dec": W_dec.detach().float(),
            "b_dec": b_dec.detach().float(),
        }
    )
    return sae.eval()


def sparsify_defaults(job: Job, batch_size: int = PEER_BATCH) -> SAE:
    """sparsify's Trainer defaults: signum (SignSGD in a schedule-free wrapper, lr 5e-3/sqrt(latents/2^14)),
    b_dec at the first batch's mean, unit-norm decoder, FVU loss, no AuxK."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    coder = SparseCoder(job.store.d_in, SparseCoderConfig(num_latents=job.d_sae, k=job.k))
    opt = ScheduleFreeWrapper(
        SignSGD([dict(params=coder.parameters(), lr=5e-3 / (job.d_sae / 2**14) ** 0.5)]), momentum=0.95
    )
    opt.train()
    for step, x in enumerate(job.batches(batch_size)):
        if len(x) < batch_size:
            continue
        if step == 0:
            coder.b_dec.data = x.mean(0)
        coder.set_decoder_norm_to_unit_norm()
        loss = coder(x).fvu
        opt.zero_grad()
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
    opt.eval()  # schedule-free: switch to the averaged weights for inference
    coder.set_decoder_norm_to_unit_norm()
    return as_topk_sae(job, coder.encoder.weight.T, coder.encoder.bias, coder.W_dec, coder.b_dec, centred=True)


def dictionary_learning_defaults(job: Job) -> SAE:
    """dictionary_learning's trainSAE with TopKTrainer and its defaults (auto lr), except the warm-up: its default
    of 1000 steps is refused for a short run, so it gets 5% of the run as ours does."""
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import trainSAE

    steps = job.budget // PEER_BATCH
    layer = int(job.hook.split(".")[1])
    with tempfile.TemporaryDirectory() as out:  # trainSAE returns nothing: its result is the saved ae.pt
        trainSAE(
            data=iter(job.batches(PEER_BATCH)),
            steps=steps,
            device="cpu",
            save_dir=out,
            trainer_configs=[
                dict(
                    trainer=TopKTrainer,
                    steps=steps,
                    activation_dim=job.store.d_in,
                    dict_size=job.d_sae,
                    k=job.k,
                    layer=layer,
                    lm_name="smollm2-135m",
                    device="cpu",
                    warmup_steps=max(1, steps // 20),
                )
            ],
        )
        sd = torch.load(Path(out) / "trainer_0" / "ae.pt", weights_only=True)
    return as_topk_sae(
        job, sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T, sd["b_dec"], centred=True
    )


def saelens_defaults(job: Job) -> SAE:
    """SAELens's SAETrainer with a TopK training SAE and its defaults (constant lr 3e-4, b_dec at zero)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=job.store.d_in, d_sae=job.d_sae, k=job.k))
    cfg = SAETrainerConfig(
        total_training_samples=job.budget, train_batch_size_samples=PEER_BATCH, device="cpu", lr_end=3e-4 / 10
    )  # what its runner config's post-init sets (lr / 10)
    trained = SAETrainer(cfg, sae, iter(job.batches(PEER_BATCH))).fit()
    return as_topk_sae(
        job,
        trained.W_enc,
        trained.b_enc,
        trained.W_dec,
        trained.b_dec,
        centred=bool(getattr(trained.cfg, "apply_b_dec_to_input", True)),
    )


def nanosae(job: Job, out: Path, **settings) -> tuple[SAE, dict]:
    """nanosae's trainer with its defaults plus `settings` (flat TrainConfig fields)."""
    settings = {"d_sae": job.d_sae, "k": job.k, **settings}
    result = train(
        TrainConfig.build(
            out=str(out), acts=str(job.store.path), tokens=job.budget, checkpoint_every=0, log_every=10_000, **settings
        )
    )
    return result.sae, result.metrics


def trainers(job: Job, out: Path, variants: list[dict]) -> dict:
    """name -> a function training one SAE (returning it, or it and nanosae's training metrics)."""
    ours = TrainConfig.build(tokens=job.budget).optim.batch_size
    runs = {
        "nanosae TopK": lambda: nanosae(job, out / "topk"),
        "nanosae BatchTopK": lambda: nanosae(job, out / "batchtopk", architecture="batchtopk"),
        "nanosae Matryoshka": lambda: nanosae(job, out / "matryoshka", architecture="matryoshka"),
        "nanosae TopK + KL fine-tune 5%": lambda: nanosae(job, out / "topk_kl", kl_finetune=0.05),
        f"sparsify (batch {PEER_BATCH})": lambda: sparsify_defaults(job),
        f"sparsify (batch {ours})": lambda: sparsify_defaults(job, ours),
        f"dictionary_learning (batch {PEER_BATCH})": lambda: dictionary_learning_defaults(job),
        f"SAELens (batch {PEER_BATCH})": lambda: saelens_defaults(job),
    }
    for v in variants:
        v = dict(v)
        name = v.pop("name", json.dumps(v))
        runs[f"nanosae {name}"] = lambda v=v, name=name: nanosae(
            job, out / name.replace(" ", "_").replace("/", "_"), **v
        )
    return runs


def main() -> None:
    p = argparse.ArgumentParser(usage=__doc__)
    p.add_argument("--job", choices=sorted(JOBS), help="one of the three jobs (sets --hook and --data)")
    p.add_argument("--hook", default=JOBS["demo"][0])
    p.add_argument("--data", action="append", help="corpus spec (repeatable; default the demo's)")
    p.add_argument("--tokens", default="200k", help="collected tokens")
    p.add_argument("--passes", type=int, default=3, help="passes every trainer makes over them")
    p.add_argument("--acts", help="a stored collection of the job (default: collect it into OUT/acts)")
    p.add_argument("--eval-tokens", type=int, default=10_000)
    p.add_argument("--only", help="comma-separated trainer names, or parts of names, to run")
    p.add_argument("--variant", action="append", default=[], help="nanosae variant as JSON (repeatable)")
    p.add_argument("--out", help="default runs/quality/JOB")
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as the nanosae command does
    hook, specs = JOBS[args.job] if args.job else (args.hook, args.data or JOBS["demo"][1])
    out = Path(args.out or f"runs/quality/{args.job or hook}")
    data = job_data(specs, out)
    job = Job(hook, data, parse_count(args.tokens), args.passes)
    model = load_model("smollm2-135m")
    t = time.perf_counter()
    if args.acts:
        job.store = ActivationStore(args.acts)
    else:
        stores = collect(CollectConfig(hooks=[hook], data=data, tokens=job.tokens, out=str(out / "acts")), model=model)
        job.store = stores[hook] if isinstance(stores, dict) else stores
    collect_s = time.perf_counter() - t
    runs = trainers(job, out / "runs", [json.loads(v) for v in args.variant])
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        exact = [w for w in wanted if w in {name.lower() for name in runs}]  # a whole name picks that one alone
        runs = {
            name: fn
            for name, fn in runs.items()
            if name.lower() in exact or any(w in name.lower() for w in wanted if w not in exact)
        }
    saes, rows = {}, {}
    for name, fn in runs.items():
        try:
            torch.manual_seed(0)  # the peers draw their initial weights from torch's global generator
            t = time.perf_counter()
            trained = fn()
            seconds = time.perf_counter() - t
        except ImportError as e:
            print(f"{name} not measured (not installed here: {e.name})")
            continue
        except Exception as e:  # a peer's own refusal: report it, measure the others
            print(f"{name} failed: {type(e).__name__}: {e}")
            continue
        sae, metrics = trained if isinstance(trained, tuple) else (trained, {})
        saes[name] = sae
        rows[name] = {"train_s": round(seconds, 1), "dead_in_training": metrics.get("dead_fraction")}
        print(f"trained {name} in {seconds:.0f} s", flush=True)
    if not saes:
        raise SystemExit("no trainer was measured (see the messages above)")
    held_out = dataclasses.replace(data, split="eval")
    seconds = {"collect": collect_s}
    if not args.acts and "nanosae TopK" in saes:  # the demo's time to result: collect, train, evaluate as it does
        t = time.perf_counter()
        evaluate(saes["nanosae TopK"], model, held_out, tokens=4096)
        seconds["time to result (collect + train + eval of 4,096 tokens, as the demo)"] = (
            collect_s + rows["nanosae TopK"]["train_s"] + time.perf_counter() - t
        )
    t = time.perf_counter()
    results = evaluate(list(saes.values()), model, held_out, tokens=args.eval_tokens)
    eval_s = time.perf_counter() - t
    for name, m in zip(saes, results):
        rows[name] |= {k: m[k] for k in ("fvu", "ce_loss_score", "kl_div", "l0", "dead_fraction")}
    n_eval = results[0]["tokens"] if results else 0
    print(
        f"\nSmolLM2-135M {hook} on {' + '.join(specs)}: {len(job.store):,} collected tokens x {job.passes} passes = "
        f"{job.budget:,} training tokens for every trainer; d_sae {job.d_sae}, k {job.k} (L0 {job.k}); "
        f"{n_eval:,} held-out eval tokens"
    )
    print(
        "\n| trainer | FVU | CE-loss score | KL | L0 | dead in training | never fired in eval | train s |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for name, r in rows.items():
        if "fvu" not in r:
            continue
        dead = "-" if r["dead_in_training"] is None else f"{r['dead_in_training']:.2%}"
        print(
            f"| {name} | {r['fvu']:.4f} | {r['ce_loss_score']:.4f} | {r['kl_div']:.4f} | {r['l0']:.1f} | {dead} | "
            f"{r['dead_fraction']:.2%} | {r['train_s']:.0f} |"
        )
    peers = [r for n, r in rows.items() if n.startswith("sparsify") and "fvu" in r]
    if peers:  # each metric against sparsify's best row for that metric
        best_fvu, best_gap = min(r["fvu"] for r in peers), min(1 - r["ce_loss_score"] for r in peers)
        print("\nagainst sparsify's best FVU and best CE-loss gap (targets: CE gap <= 0.75x, FVU <= 0.9x):")
        for name, r in rows.items():
            if name.startswith("nanosae") and "fvu" in r:
                print(f"  {name}: CE gap {(1 - r['ce_loss_score']) / best_gap:.2f}x, FVU {r['fvu'] / best_fvu:.2f}x")
    seconds["eval of every SAE"] = eval_s
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    name = f"quality_{args.job}" if args.job else "quality"
    save(
        name + ".py",
        {
            "job": {
                "hook": hook,
                "data": specs,
                "collected_tokens": len(job.store),
                "passes": job.passes,
                "training_tokens": job.budget,
                "d_sae": job.d_sae,
                "k": job.k,
                "eval_tokens": n_eval,
            },
            "rows": rows,
            "seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
