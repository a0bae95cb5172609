#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU (the device tool lends one to some tasks).
# About 7 minutes on one H200; each phase has a time limit, so it ends inside 8:
#   1. the machine: GPU, driver, CPU, torch and onnxruntime (gpu_env.txt);
#   2. the CUDA tests (torch._int_mm against fake-quant, FP8 against an e4m3 formula, the inductor
#      backend's CUDA route with the cache and no recompiles), skipped everywhere else (gpu_tests.txt);
#   3. benchmarks/gpu_speed.py on DiT-XL/2, batch 32: per forward and over 50 steps, eager FP32/bf16,
#      torch.compile bf16, ours W8A8 (torch._int_mm, and through Inductor) and FP8 (torch._scaled_mm),
#      each end to end with and without the cache, and our INT8 ONNX on onnxruntime's CUDA provider
#      where it exists (gpu_speed.json, gpu_speed.md, gpu_speed.log).
# It uses the machine's own python3 and torch (no install: nothing can be fetched there), and writes to
# $OUT (default benchmarks/results). MODEL, BATCH, STEPS, TEST_S and SPEED_S override the defaults.
#
#   benchmarks/gpu_check.sh                       # on the GPU machine, from anywhere
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
MODEL=${MODEL:-DiT-XL/2}
BATCH=${BATCH:-32}
STEPS=${STEPS:-50}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/qc_inductor_cache}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    lscpu | grep -E "Model name|^CPU\(s\)"
    $PY -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability()); print('onnxruntime', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$OUT/gpu_env.txt"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
timeout "${TEST_S:-150}" $PY -m pytest -q -p no:cacheprovider -o addopts="" -rs --continue-on-collection-errors \
    tests/test_torch_int8.py tests/test_inductor.py tests/test_onnx.py -k "cuda or fp8 or int_mm" 2>&1 | tee "$OUT/gpu_tests.txt"
timeout "${SPEED_S:-420}" $PY benchmarks/gpu_speed.py --model "$MODEL" --batch "$BATCH" --steps "$STEPS" \
    --json "$OUT/gpu_speed.json" --md "$OUT/gpu_speed.md" 2>&1 | tee "$OUT/gpu_speed.log"
echo "gpu_check done: $OUT"
