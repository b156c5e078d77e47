"""The sweeps behind the training defaults: TrainConfig variants on several jobs side by side, so a change that
helps one job and hurts another shows.

Each job is a stored collection (its manifest names the model, hook and corpus); every variant trains on it for
`--passes` passes (TopK d_sae 4608, k 32 unless the variant says otherwise) and is evaluated on the job's
held-out documents (the corpus's eval split), all variants of a job on the same tokens in one shared clean pass.
  python benchmarks/sweep_defaults.py --store demo=runs/quality/demo/acts/blocks.15.hook_resid_post \
      --store stdlib5=runs/quality/stdlib5/acts/blocks.5.hook_resid_post \
      --store pydocs25=runs/quality/pydocs25/acts/blocks.25.hook_resid_post \
      '{"name": "defaults"}' '{"name": "lr 1.5x", "lr_scale": 1.5}' '{"name": "kl 5%", "kl_finetune": 0.05}'
A variant is flat TrainConfig settings as JSON ("name" labels it); the first is the baseline the others are
compared with, per job (FVU and CE-loss gap as ratios to it).
"""

import argparse
import dataclasses
import json
import time

import torch
from _results import save
from quality import Job, nanosae

from nanosae import ActivationStore, DataConfig
from nanosae.eval import evaluate
from nanosae.models import keep_freed_memory, load_model


def main() -> None:
    p = argparse.ArgumentParser(usage=__doc__)
    p.add_argument("--store", action="append", required=True, help="NAME=STORE_DIR (repeatable)")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=10_000)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("variants", nargs="+")
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as the nanosae command does
    variants = [json.loads(v) for v in args.variants]
    names = [v.pop("name", json.dumps(v)) for v in variants]
    table: dict[str, dict[str, dict]] = {name: {} for name in names}
    models = {}
    for spec in args.store:
        job_name, _, path = spec.partition("=")
        store = ActivationStore(path)
        m = store.manifest
        data = DataConfig.from_dict(m["data"])
        job = Job(m["hook"], data, len(store), args.passes, store=store)
        saes = {}
        for name, settings in zip(names, variants):
            t = time.perf_counter()
            sae, metrics = nanosae(job, f"{args.out}/{job_name}/{name.replace(' ', '_').replace('/', '_')}", **settings)
            saes[name] = sae
            table[name][job_name] = {
                "train_s": round(time.perf_counter() - t, 1),
                "dead_in_training": metrics["dead_fraction"],
            }
            print(f"{job_name}: {name} trained in {table[name][job_name]['train_s']:.0f} s", flush=True)
        if m["model"] not in models:
            models[m["model"]] = load_model(m["model"])
        held_out = dataclasses.replace(data, split="eval")
        results = evaluate(list(saes.values()), models[m["model"]], held_out, tokens=args.eval_tokens)
        for name, r in zip(saes, results):
            table[name][job_name] |= {k: r[k] for k in ("fvu", "ce_loss_score", "kl_div", "dead_fraction")}
            print(json.dumps({"job": job_name, "variant": name, **table[name][job_name]}), flush=True)
    jobs = [s.partition("=")[0] for s in args.store]
    base = table[names[0]]
    print(f"\n{args.passes} passes over each store; FVU / CE-loss score (ratio of FVU, of CE gap to '{names[0]}')\n")
    print("| variant | " + " | ".join(jobs) + " |\n|---|" + "---|" * len(jobs))
    for name in names:
        cells = []
        for j in jobs:
            r, b = table[name][j], base[j]
            ratio = (
                f" ({r['fvu'] / b['fvu']:.2f}x, {(1 - r['ce_loss_score']) / max(1e-9, 1 - b['ce_loss_score']):.2f}x)"
                if name != names[0]
                else ""
            )
            cells.append(f"{r['fvu']:.4f} / {r['ce_loss_score']:.4f}{ratio}, {r['train_s']:.0f} s")
        print(f"| {name} | " + " | ".join(cells) + " |")
    save(__file__, {"passes": args.passes, "variants": dict(zip(names, variants)), "results": table})


if __name__ == "__main__":
    main()
