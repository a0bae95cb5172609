#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU (the device tool lends one to some tasks):
#   1. the CUDA tests (torch._int_mm INT8 against fake-quant), skipped everywhere else;
#   2. per-forward speed of DiT-XL/2 at batch 8 and 32: eager FP32, bf16, torch.compile bf16, ours W8A8.
# It uses the machine's own python3 and torch (no install: nothing can be fetched there) and writes its
# logs and JSON to $OUT (default benchmarks/results). About 5 minutes on an H200.
#
#   benchmarks/gpu_check.sh                       # on the GPU machine, from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
$PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_torch_int8.py -k "cuda or int_mm" 2>&1 | tee "$OUT/gpu_tests.txt"
for b in 8 32; do
    $PY benchmarks/gpu_speed.py --model DiT-XL/2 --batch $b --json "$OUT/gpu_speed_dit-xl2_b$b.json" 2>&1 | tee "$OUT/gpu_speed_dit-xl2_b$b.md"
done
