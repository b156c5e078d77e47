"""`make bench`: run every benchmark script in this folder and print their figures.

train_throughput.py and quality.py compare with the peers, so make bench runs them in .venv-bench;
sweep_defaults.py and architectures.py need stores on their command line; gpu.py runs only where CUDA is."""

import subprocess
import sys
from pathlib import Path

import torch

here = Path(__file__).parent
failed = []
for script in sorted(here.glob("*.py")):
    if (
        script.name.startswith("_")
        or script.name
        in (Path(__file__).name, "train_throughput.py", "quality.py", "sweep_defaults.py", "architectures.py")
        or (script.name == "gpu.py" and not torch.cuda.is_available())
    ):
        continue
    print(f"\n=== {script.name} ===", flush=True)
    if subprocess.run([sys.executable, str(script)]).returncode != 0:
        failed.append(script.name)
sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
