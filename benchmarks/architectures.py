"""Architectures compared on what they are for: TopK, BatchTopK, Matryoshka and ReLU SAEs of the same width
(4608) trained on the demo's store with nanosae's defaults, then the full evaluation suite side by side (core
metrics on shared held-out tokens, first-letter absorption, sparse probing; explanation scores need a
features.db per SAE and are left out). Also times the full suite on the first SAE alone, as `nanosae eval
RUN --suite full` runs it on the demo's run (target: at most 3 minutes here).

  python benchmarks/architectures.py --acts runs/demo/acts/blocks.15.hook_resid_post [--passes 3] [--out runs/arch]
"""

import argparse
import time

import torch
from _results import save

from nanosae import ActivationStore, DataConfig, TrainConfig
from nanosae.eval import evaluate
from nanosae.eval.suite import run_suite
from nanosae.models import keep_freed_memory, load_model
from nanosae.train import train

ARCHITECTURES = {
    "TopK": {"architecture": "topk"},
    "BatchTopK": {"architecture": "batchtopk"},
    "Matryoshka": {"architecture": "matryoshka"},
    "ReLU": {"architecture": "relu"},
}
ROWS = [
    ("core", "fvu"),
    ("core", "ce_loss_score"),
    ("core", "l0"),
    ("core", "dead_fraction"),
    ("absorption", "mean_absorption_fraction_score"),
    ("absorption", "mean_full_absorption_score"),
    ("absorption", "mean_num_split_features"),
    ("sparse_probing", "llm_test_accuracy"),
    ("sparse_probing", "sae_test_accuracy"),
    ("sparse_probing", "sae_top_1_test_accuracy"),
    ("sparse_probing", "sae_top_2_test_accuracy"),
    ("sparse_probing", "sae_top_5_test_accuracy"),
    ("sparse_probing", "sae_top_20_test_accuracy"),
]


def main() -> None:
    p = argparse.ArgumentParser(usage=__doc__)
    p.add_argument("--acts", required=True)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--out", default="runs/arch")
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    store = ActivationStore(args.acts)
    saes, train_s = {}, {}
    for name, settings in ARCHITECTURES.items():
        t = time.perf_counter()
        result = train(
            TrainConfig.build(
                out=f"{args.out}/{name}",
                acts=args.acts,
                tokens=args.passes * len(store),
                d_sae=4608,
                k=32,
                checkpoint_every=0,
                log_every=10_000,
                resume=True,
                **settings,
            )
        )
        saes[name], train_s[name] = result.sae, time.perf_counter() - t
        print(f"trained {name} in {train_s[name]:.0f} s", flush=True)
    model = load_model(store.manifest["model"])
    hook = store.manifest["hook"]
    held_out = DataConfig.from_dict({**store.manifest["data"], "split": "eval"})
    # the suite on one SAE alone, as `nanosae eval RUN --suite full` runs it (core: the demo's 4,096 tokens)
    first = next(iter(saes))
    t = time.perf_counter()
    evaluate(saes[first], model, held_out, tokens=args.eval_tokens)
    core_s = time.perf_counter() - t
    t = time.perf_counter()
    run_suite([saes[first]], model, [hook], [None])
    suite_s = core_s + time.perf_counter() - t
    print(f"full suite on {first} alone: {suite_s:.0f} s (core {core_s:.0f} s)", flush=True)
    core = evaluate(list(saes.values()), model, held_out, tokens=args.eval_tokens)
    sections = run_suite(list(saes.values()), model, [hook] * len(saes), [None] * len(saes))
    results = {name: {"core": c, **s} for name, c, s in zip(saes, core, sections)}
    print(
        f"\nSmolLM2-135M {hook}, {len(store):,} stored tokens x {args.passes} passes, d_sae 4608 (k 32 for the TopK "
        f"family), {core[0]['tokens']:,} held-out tokens for the core metrics\n"
    )
    print("| metric | " + " | ".join(saes) + " |\n|---|" + "---|" * len(saes))
    for section, key in ROWS:
        cells = [(results[n].get(section) or {}).get(key) for n in saes]
        print(f"| {section}: {key} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in cells) + " |")
    print("| train s | " + " | ".join(f"{train_s[n]:.0f}" for n in saes) + " |")
    print(f"\nfull suite on one SAE: {suite_s:.0f} s (target <= 180 s)")
    slim = {
        n: {
            s: {
                k: v
                for k, v in (r.get(s) or {}).items()
                if k not in ("details", "feature_density", "l0_histogram", "fvu_by_position", "config")
            }
            for s in ("core", "absorption", "sparse_probing")
        }
        for n, r in results.items()
    }
    save(__file__, {"results": slim, "train_s": train_s, "suite_s_one_sae": suite_s, "core_s": core_s})


if __name__ == "__main__":
    main()
