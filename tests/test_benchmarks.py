"""benchmarks/gpu.py cannot be measured without a GPU; its --smoke mode runs every part (SAE training steps,
collection from bfloat16 Llama/Gemma-shaped models, streaming training) on tiny shapes, so the script that
will be run on a GPU is known to work."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_gpu_benchmark_runs_every_part_in_smoke_mode(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=script.parent,
        env=os.environ | {"NANOSAE_BENCH_OUT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "gpu.json").read_text())["figures"]
    shape = figures["training"]["64x512 k8"]
    assert shape["nanosae"] > 0 and shape["nanosae --encoder-bf16"] > 0 and shape["GEMM bound (float32)"] > 0
    assert set(figures["collection"]) == {"gemma-2-2b", "llama-3.2-1b"}
    assert all(r["collect_tokens_per_s"] > 0 and r["forward_tokens_per_s"] > 0 for r in figures["collection"].values())
    assert figures["streaming"]["train_tokens_per_s"] > 0
    assert "collection (bfloat16 model)" in proc.stdout and "streaming training" in proc.stdout
