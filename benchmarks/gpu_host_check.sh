#!/usr/bin/env bash
# One device call's CPU checks on the GPU machine, whose host CPU has AMX-INT8/BF16 (issue 18's goals),
# run side by side, each timing on its own cores:
#   lane A: the AMX table per forward, every row but onnxruntime's (amx_check.sh PART=forward);
#   lane B: end to end over 50 steps: eager FP32 (the reference), ours through Inductor with the cache
#           (interval 2), attention in FP32 and in bf16, then the same with a graph break per cached
#           region (the lowering before whole-graph cache patterns: their A/B);
#   lane C: end to end, no reference: compiled bf16 and both PT2E rows (the baselines the goals name),
#           and ours through Inductor without the cache;
#   and beside them, on the build CPUs, the CUDA tests (the fixes since the last GPU run).
# Lanes A, B and C each time on 2 logical CPUs of 2 physical cores (the cores' other threads left idle);
# their builds (compiles, calibration) and the CUDA tests run on the CPUs left. The lanes still share
# the CPU's caches and memory, so compare rows within a lane; lane B's and C's rows run one after another,
# beside a busy neighbour. LIMIT_S bounds the call (default 540 s).
#
#   the device tool:  run(command="benchmarks/gpu_host_check.sh", carry=[".whl"], timeout_s=590)
#   (.whl holds torchao wheels, for the PT2E rows: the newest that quantizes here is used; download as
#   benchmarks/amx_check.sh's header says, one line per version: 0.18.0, 0.17.0, 0.16.0, 0.15.0)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
LIMIT_S=${LIMIT_S:-540}
START=$SECONDS
mkdir -p "$OUT"
# lanes A, B, C: one logical CPU on each of two physical cores each; BUILD: every CPU of the other cores
# (LANES="A B C BUILD", four CPU lists, overrides: a check of this script on a small machine)
read -r A B C BUILD < <([ -n "${LANES:-}" ] && echo "$LANES" || python3 - <<'EOF2'
import subprocess
cores = {}
for line in subprocess.check_output(["lscpu", "-p=CPU,CORE"], text=True).splitlines():
    if not line.startswith("#"):
        cpu, core = line.split(",")[:2]
        cores.setdefault(int(core or cpu), []).append(int(cpu))  # no topology given: each CPU its own core
order = sorted(cores)
lanes = [[cores[k][0] for k in order[i:i + 2]] for i in (0, 2, 4)] + [[c for k in order[6:] for c in cores[k]]]
print(*(",".join(map(str, lane)) for lane in lanes))
EOF2
)
[ -n "$BUILD" ] || { echo "gpu_host_check.sh: needs at least 7 physical cores (3 lanes of 2, builds); run amx_check.sh alone"; exit 2; }
# torchao: the newest carried wheel whose PT2E quantizes with this machine's torch (benchmarks/pt2e_probe.py;
# torchao 0.18 matched nothing on torch 2.11), so that the PT2E rows time an INT8 model, not a float one
PROBE=""
for wheel in $(ls .whl/torchao-*.whl 2>/dev/null | sort -rV); do
    rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        "$wheel" || continue
    said=$(PYTHONPATH=/tmp/site:$PWD timeout 120 python3 benchmarks/pt2e_probe.py 2>/dev/null)
    ok=$?
    PROBE+="$(tail -n 1 <<< "$said")"$'\n'
    if [ "$ok" = 0 ]; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        break
    fi
done
{
    echo "timing: lane A cpus $A, lane B $B, lane C $C (their cores' other threads idle); builds and tests: $BUILD"
    lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1
    python3 -c "import torch; print('torch', torch.__version__)"
    python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
    printf "%s" "$PROBE"
} > "$OUT/host_env.txt" 2>&1
cat "$OUT/host_env.txt"
LEFT=$((LIMIT_S - (SECONDS - START)))  # what the wheel probes left of the call
export OUT BUILD_CPUS="$BUILD" SPEED_S=$((LEFT - 15))
# lane A times about 100 s after its builds: no baseline build starts in its last 4 minutes
PART=forward NO_ORT=1 TIME_CPUS="$A" BUILD_S=$((LEFT - 240)) benchmarks/amx_check.sh > /dev/null 2>&1 &
LANE_A=$!
PART=e2e TAG=e2e_ours TIME_CPUS="$B" ROWS="Inductor INT8 + cache,(fused SDPA) + cache,(two matmuls) + cache" benchmarks/amx_check.sh \
    > /dev/null 2>&1 &
LANE_B=$!
PART=e2e TAG=e2e_baselines NO_REF=1 TIME_CPUS="$C" ROWS="torch.compile bf16,PT2E,=ours W8A8 Inductor INT8" \
    benchmarks/amx_check.sh > /dev/null 2>&1 &
LANE_C=$!
(
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    PIN=()
    command -v taskset > /dev/null && PIN=(taskset -c "$BUILD")
    timeout 200 "${PIN[@]}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
        --continue-on-collection-errors tests/test_torch_int8.py tests/test_inductor.py tests/test_onnx.py \
        -k "cuda or fp8 or int_mm" > "$OUT/gpu_tests.txt" 2>&1
) &
TESTS=$!
wait $LANE_A $LANE_B $LANE_C $TESTS
echo "lanes done"
tail -n 30 "$OUT"/amx_*.md "$OUT/gpu_tests.txt" 2>/dev/null | grep -v -i "warn"
