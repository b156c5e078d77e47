"""LLM explanations with the local model: seconds per feature, explained and detection-scored.

Explains the --features most frequent features of a run (a copy of its features.db; the run is not changed)
with SmolLM2 in its chat format: one generated line per feature, then yes/no answers on up to 10 active and
10 silent held-out windows from one batched forward pass. Target: 100 features in <= 5 minutes on 2 cores.
Usage: python benchmarks/llm_explain.py RUN [--features 100]
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _results import save

from nanosae.interp.featuredb import FeatureDB
from nanosae.interp.llm_explain import LocalExplainer, explain_llm
from nanosae.rundir import load_sae_and_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--features", type=int, default=100)
    args = p.parse_args()
    _, _, model = load_sae_and_model(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "features.db"
        shutil.copy(Path(args.run) / "features.db", db)
        t = time.perf_counter()
        n = explain_llm(db, LocalExplainer(model), max_features=args.features)
        seconds = time.perf_counter() - t
        rows = [r for r in FeatureDB(db).latents() if r["method"] == "llm" and r["score"] is not None]
    mean = sum(r["score"] for r in rows) / max(1, len(rows))
    print(
        f"| features | explained | seconds | s/feature | mean detection score |\n|---|---|---|---|---|\n"
        f"| {args.features} | {n} | {seconds:.0f} | {seconds / max(1, args.features):.2f} | {mean:.3f} |"
    )
    print(f"projected for 100 features: {100 * seconds / max(1, args.features):.0f} s (target <= 300 s)")
    save(__file__, {"features": args.features, "explained": n, "seconds": seconds, "mean_score": mean})


if __name__ == "__main__":
    main()
