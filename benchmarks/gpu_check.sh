#!/usr/bin/env bash
# The GPU check in one go, for a fresh GPU machine: install what is missing, run the CUDA variants of the tests,
# then benchmarks/gpu.py. Everything a reader needs lands in $OUT (default runs/gpu_check):
#   versions.txt (nvidia-smi, torch/CUDA/Triton), pytest.txt (the CUDA tests' summary), gpu.txt + gpu.json.
# Usage: bash benchmarks/gpu_check.sh [--smoke]     (--smoke: gpu.py's tiny shapes, how it is rehearsed on a CPU)
# Offline machines: put the wheels of eai-sparsify and its pure-Python needs in .whl/ (they are installed from
# there with --no-index); with a network, the missing ones come from PyPI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SMOKE=${1:-}

# 1. What is needed: a torch that sees the GPU (the machine's own when it has one), Triton for sparsify's
# decoder, sparsify itself (a peer: never a dependency of the package), and nanosae from this checkout.
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or '$SMOKE' else 1)" 2>/dev/null; then
    $PY -m pip install -q torch triton || { echo "no CUDA build of torch could be installed" | tee "$OUT/versions.txt"; exit 1; }
fi
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu_check_site .whl/*.whl \
        || echo "the wheels in .whl/ did not install: sparsify will not be measured"
    export PYTHONPATH=/tmp/gpu_check_site
elif ! $PY -c "import sparsify" 2>/dev/null; then
    $PY -m pip install -q eai-sparsify==1.3.3
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not found"
    $PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
for name in ("triton", "transformers", "sparsify", "datasets"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "not importable:", str(e).splitlines()[0])
EOF
} 2>&1 | tee "$OUT/versions.txt"

# 2. The CUDA variants of the tests (the `device` fixture's cuda parameter), only those.
CUDA_TESTS="tests/sae/test_kernels.py tests/sae/test_model.py tests/train/test_trainer.py tests/eval/test_metrics.py
            tests/interp/test_live.py"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rfEs -k cuda $CUDA_TESTS 2>&1 | tee "$OUT/pytest.txt"

# 3. The figures.
timeout 330 $PY benchmarks/gpu.py $SMOKE 2>&1 | tee "$OUT/gpu.txt"
cp runs/benchmarks/gpu.json "$OUT/" 2>/dev/null || true
