#!/usr/bin/env bash
# Issue 18's AMX rows, for a CPU with AMX-INT8/BF16 (the GPU machine's host is one: Intel Xeon family 6
# model 207, 16 threads; no CPU session has had one yet). DiT-B/2, batch 8, 2 threads, every row of one
# run: eager FP32/bf16, torch.compile FP32/bf16, torchao PT2E static INT8 + compile (all layers and ours),
# torchao dynamic INT8 + compile, onnxruntime's quantizers, ours through the torch and inductor backends.
# PART=forward (the default): per forward (about 5 minutes); PART=e2e: only the 50-step rows the goals name
# (eager FP32, compiled bf16, both PT2E rows, ours through Inductor with and without the cache);
# PART=both: the two tables in one process. ROWS: the end-to-end rows (--e2e-only), NO_REF=1 leaves out
# eager FP32 end to end, NO_ORT=1 the onnxruntime rows per forward. TIME_CPUS and BUILD_CPUS: the
# logical CPUs to time on and to build on, so that runs side by side time on their own cores
# (benchmarks/gpu_host_check.sh). BUILD_S: --build-s (per forward, start no
# baseline's build after that many seconds). TAG names the outputs (default PART). MODEL, BATCH, STEPS and
# REPEATS override the goals' DiT-B/2, 8, 50 and 5 (a quick check of the script itself).
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
PART=${PART:-forward}
ROWS=${ROWS:-torch.compile bf16,PT2E,Inductor INT8}
case "$PART" in
    forward) ARGS=(--no-e2e) ;;
    e2e) ARGS=(--no-forward --e2e-only "$ROWS") ;;
    both) ARGS=(--e2e-only "$ROWS") ;;
    *) echo "amx_check.sh: PART is forward, e2e or both, not '$PART'"; exit 2 ;;
esac
[ "${NO_REF:-0}" = 1 ] && ARGS+=(--e2e-no-reference)
[ "${NO_ORT:-0}" = 1 ] && ARGS+=(--no-ort)
[ -n "${TIME_CPUS:-}" ] && ARGS+=(--time-cpus "$TIME_CPUS")
[ -n "${BUILD_CPUS:-}" ] && ARGS+=(--build-cpus "$BUILD_CPUS")
[ -n "${BUILD_S:-}" ] && ARGS+=(--build-s "$BUILD_S")
TAG=${TAG:-$PART}
timeout "${SPEED_S:-840}" $PY benchmarks/forward_speed.py --models "${MODEL:-DiT-B/2}" --batch "${BATCH:-8}" \
    --threads 2 --repeats "${REPEATS:-5}" --steps "${STEPS:-50}" "${ARGS[@]}" --json "$OUT/amx_dit-b2_$TAG.json" 2>&1 | tee "$OUT/amx_dit-b2_$TAG.md"
