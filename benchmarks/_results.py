"""Where a benchmark script writes its figures as JSON, beside the table it prints: runs/benchmarks/NAME.json
(or $NANOSAE_BENCH_OUT/NAME.json), with the date, the machine and the command that made them."""

import json
import os
import platform
import sys
import time
from pathlib import Path


def save(script: str, figures: dict) -> Path:
    out = Path(os.environ.get("NANOSAE_BENCH_OUT", "runs/benchmarks")) / f"{Path(script).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "figures": figures,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"(figures in {out})")
    return out
