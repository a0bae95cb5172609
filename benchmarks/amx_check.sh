#!/usr/bin/env bash
# Issue 18's AMX rows, for a CPU with AMX-INT8/BF16 (the GPU machine's host is one: Intel Xeon family 6
# model 207, 16 threads; no CPU session has had one yet). DiT-B/2, batch 8, 2 threads, every row of one
# run: eager FP32/bf16, torch.compile FP32/bf16, torchao PT2E static INT8 + compile (all layers and ours),
# torchao dynamic INT8 + compile, onnxruntime's quantizers, ours through the torch and inductor backends.
# Per forward always (about 5 minutes); end to end over 50 steps when E2E=1 (eager FP32, compiled bf16,
# PT2E on our layers, ours through Inductor with and without the cache; about 8 more minutes).
#
# torchao is the baselines' package (the `bench` extra). On the GPU machine carry its wheel (3.4 MB):
#   here:  echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0
#   there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#          benchmarks/amx_check.sh                    (writes amx_*.json / .md under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
grep -o -m1 "amx_int8" /proc/cpuinfo || echo "warning: this CPU has no AMX-INT8; the table is still one run's, but not the AMX rows"
E2E_ARGS=(--no-e2e)
if [ "${E2E:-0}" = 1 ]; then
    E2E_ARGS=(--e2e-only "torch.compile bf16,our layers,Inductor INT8")
fi
timeout "${SPEED_S:-840}" $PY benchmarks/forward_speed.py --models DiT-B/2 --batch 8 --threads 2 --repeats 5 --steps 50 \
    "${E2E_ARGS[@]}" --json "$OUT/amx_dit-b2.json" 2>&1 | tee "$OUT/amx_dit-b2.md"
