"""The sweep behind the training defaults: held-out FVU / L0 / dead latents for TrainConfig variants.

Needs a training store and a held-out store of the demo's job (SmolLM2 blocks.15, pydocs + stdlib):
  nanosae collect --hook blocks.15.hook_resid_post --data builtin:pydocs --data builtin:stdlib --tokens 200k --out S/train
  nanosae collect --hook blocks.15.hook_resid_post --data builtin:pydocs --data builtin:stdlib --split eval \
      --tokens 30k --out S/eval
  python benchmarks/sweep_defaults.py S/train/blocks.15.hook_resid_post S/eval/blocks.15.hook_resid_post \
      '{"name": "b1024 lr1e-3", "batch_size": 1024, "lr": 0.001}' '{"batch_size": 4096}' ...
Each variant: TopK d_sae 4608, k 32, 200k tokens unless the JSON says otherwise; one JSON line of results each.
"""

import json
import sys
import tempfile
import time

import torch

from nanosae import ActivationStore, TrainConfig
from nanosae.train import train


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    torch.set_num_threads(2)
    train_store, eval_store, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
    held_out = ActivationStore(eval_store).tokens(0, 20_000).float()
    variance = (held_out - held_out.mean(0)).pow(2).sum()
    for spec in variants:
        kw = json.loads(spec)
        name = kw.pop("name", spec)
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(out=out, acts=kw.pop("acts", train_store), tokens=kw.pop("tokens", 200_000),
                              checkpoint_every=0, log_every=1000, **kw)
            t = time.perf_counter()
            result = train(cfg)
            seconds = time.perf_counter() - t
        with torch.no_grad():
            x_hat, z = result.sae.eval()(held_out)
        print(json.dumps({"name": name, "heldout_fvu": round(float((x_hat - held_out).pow(2).sum() / variance), 4),
                          "l0": round(float((z > 0).sum(-1).float().mean()), 1),
                          "dead_in_training": round(result.metrics["dead_fraction"], 4),
                          "never_fired_heldout": round(float(((z > 0).sum(0) == 0).float().mean()), 4),
                          "batch_size": cfg.batch_size, "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
