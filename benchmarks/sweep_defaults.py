"""The sweeps behind the training defaults: held-out FVU / L0 / dead latents (and, with --ce-tokens, the
CE-loss score and KL from splicing each SAE into the model) for TrainConfig variants.

Needs a training store and a held-out store of the demo's job (SmolLM2 blocks.15, pydocs + stdlib):
  nanosae collect --hook blocks.15.hook_resid_post --data builtin:pydocs --data builtin:stdlib --tokens 200k --out S/train
  nanosae collect --hook blocks.15.hook_resid_post --data builtin:pydocs --data builtin:stdlib --split eval \
      --tokens 30k --out S/eval
  python benchmarks/sweep_defaults.py S/train/blocks.15.hook_resid_post S/eval/blocks.15.hook_resid_post \
      [--ce-tokens 10240] '{"name": "b1024 lr1e-3", "batch_size": 1024, "lr": 0.001}' '{"tokens": 400000}' ...
Each variant: TopK d_sae 4608, k 32, 200k tokens unless the JSON says otherwise; one JSON line of results each.
--ce-tokens N: afterwards, evaluate every variant on the same N held-out tokens of the model (one shared clean
pass; `nanosae.evaluate`), one more JSON line each.
"""

import argparse
import json
import tempfile
import time

import torch

from nanosae import ActivationStore, TrainConfig
from nanosae.train import train

from _results import save


def main() -> None:
    p = argparse.ArgumentParser(usage=__doc__)
    p.add_argument("train_store")
    p.add_argument("eval_store")
    p.add_argument("variants", nargs="+")
    p.add_argument("--ce-tokens", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    held_out = ActivationStore(args.eval_store).tokens(0, 20_000).float()
    variance = (held_out - held_out.mean(0)).pow(2).sum()
    trained, figures = {}, []
    for spec in args.variants:
        kw = json.loads(spec)
        name = kw.pop("name", spec)
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig.build(out=out, acts=kw.pop("acts", args.train_store), tokens=kw.pop("tokens", 200_000),
                              checkpoint_every=0, log_every=1000, **kw)
            t = time.perf_counter()
            result = train(cfg)
            seconds = time.perf_counter() - t
        trained[name] = result.sae.eval()
        with torch.no_grad():
            x_hat, z = result.sae(held_out)
        figures.append({"name": name, "heldout_fvu": round(float((x_hat - held_out).pow(2).sum() / variance), 4),
                        "l0": round(float((z > 0).sum(-1).float().mean()), 1),
                        "dead_in_training": round(result.metrics["dead_fraction"], 4),
                        "never_fired_heldout": round(float(((z > 0).sum(0) == 0).float().mean()), 4),
                        "batch_size": cfg.optim.batch_size, "seconds": round(seconds, 1)})
        print(json.dumps(figures[-1]), flush=True)
    if args.ce_tokens:
        from nanosae.eval import evaluate
        from nanosae.models import load_model

        results = evaluate(list(trained.values()), load_model("smollm2-135m"), ["builtin:pydocs", "builtin:stdlib"],
                           tokens=args.ce_tokens)
        for name, r in zip(trained, results):
            figures.append({"name": name, "tokens": r["tokens"], **{k: round(r[k], 4) for k in (
                "fvu", "ce_loss_score", "kl_div", "cosine_similarity", "dead_fraction")}})
            print(json.dumps(figures[-1]), flush=True)
    save(__file__, figures)


if __name__ == "__main__":
    main()
