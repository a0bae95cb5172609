#!/usr/bin/env bash
# Regenerate the figures of docs/RESULTS.md, each into benchmarks/results/ (JSON with the machine, and
# the printed table beside it). Long: the quality runs at 2,000 samples take hours on 2 CPU cores.
#
#   benchmarks/run_results.sh             # everything
#   benchmarks/run_results.sh speed       # the speed tables only (tens of minutes)
#   benchmarks/run_results.sh quality     # the quality and ablation tables only (hours)
#   benchmarks/run_results.sh mmdit       # the text-conditioned mmdit-mnist ablation (hours)
#
# Compare figures only within one run, on one machine: every output starts with the machine line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QC=${QC:-.venv/bin/qc}
OUT=benchmarks/results
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE  # onnxruntime's spinning threads otherwise slow the next row on 2 cores
what=${1:-all}

run() {  # run NAME COMMAND...: the table to NAME.md, the JSON the command writes to NAME.json
    local name=$1; shift
    echo ">> $name: $*"
    "$@" | tee "$OUT/$name.md"
}

if [[ $what == all || $what == speed ]]; then
    run gemm_peak_DiT-B-2 $PY benchmarks/gemm_peak.py --model DiT-B/2 --threads 2 --json "$OUT/gemm_peak_DiT-B-2.json"
    run gemm_peak_DiT-S-2 $PY benchmarks/gemm_peak.py --model DiT-S/2 --threads 2 --json "$OUT/gemm_peak_DiT-S-2.json"
    run cache_speed_dit-mnist $PY benchmarks/cache_speed.py --models dit-mnist --repeats 3 --threads 2 \
        --json "$OUT/cache_speed_dit-mnist.json"
    run cache_speed_DiT-B-2 $PY benchmarks/cache_speed.py --models DiT-B/2 --repeats 3 --threads 2 \
        --json "$OUT/cache_speed_DiT-B-2.json"
    for p in DiT-B/2 DiT-S/2; do
        run "profile_${p/\//-}" $PY benchmarks/profile_forward.py --model $p --batch 8 --threads 2 \
            --json "$OUT/profile_${p/\//-}.json"
    done
    run profile_DiT-B-2_int_mm $PY benchmarks/profile_forward.py --model DiT-B/2 --batch 8 --threads 2 --kernel int_mm \
        --json "$OUT/profile_DiT-B-2_int_mm.json"
    run ort_probe $PY benchmarks/ort_probe.py --model DiT-B/2 --threads 2 --json "$OUT/ort_probe.json"
    run kernel_probe $PY benchmarks/kernel_probe.py --threads 2 --repeats 60 --block-mib 1,2,4,8 \
        --json "$OUT/kernel_probe.json"
    # bf16 attention past 32 MiB of scores: the blocks, at 1024 and 4096 tokens (an SD3 image at 1024 px)
    run kernel_probe_1024 $PY benchmarks/kernel_probe.py --threads 2 --repeats 15 --batch 2 --hidden 1024 \
        --tokens 1024 --layers 2 --block-mib 0.5,1,2,4,8 --json "$OUT/kernel_probe_1024.json"
    run kernel_probe_4096 $PY benchmarks/kernel_probe.py --threads 2 --repeats 5 --batch 1 --hidden 1536 \
        --tokens 4096 --layers 2 --block-mib 0.5,1,2,4,8 --json "$OUT/kernel_probe_4096.json"
    run forward_speed_DiT-S-2_64x64 $PY benchmarks/forward_speed.py --models DiT-S/2 --input-size 64 --batch 8 \
        --repeats 5 --threads 2 --no-ort --no-e2e --json "$OUT/forward_speed_DiT-S-2_64x64.json"
    run onnx_parity $PY benchmarks/onnx_parity.py --models dit-mnist,DiT-S/2,DiT-B/2 --steps 50 --batch 8 --threads 2 \
        --json "$OUT/onnx_parity.json"
    # one model per process, so a table lands as soon as its model is done (DiT-B/2 alone takes about 40 min)
    for m in dit-mnist DiT-S/2 DiT-B/2; do
        run "forward_speed_${m/\//-}" $PY benchmarks/forward_speed.py --models $m --batch 8 --repeats 9 --threads 2 \
            --json "$OUT/forward_speed_${m/\//-}.json"
    done
    run tap_scaling $PY benchmarks/tap_scaling.py --sizes 5000,20000,50000 --exact-limit 5000 --threads 2 \
        --json "$OUT/tap_scaling.json"
    run tap_scaling_capped $PY benchmarks/tap_scaling.py --sizes 5000,20000,50000 --exact-limit 0 \
        --max-landmarks 1000 --threads 2 --json "$OUT/tap_scaling_capped.json"
fi

if [[ $what == all || $what == quality ]]; then
    run eval_fp32 $QC eval --model dit-mnist --n 1000 --steps 50 --cfg 1.5 --seed 0 --batch-size 250 --threads 2 \
        --out "$OUT/eval_fp32.json"
    # 1,000 samples: quantization without a cache, with the conditioning linears' inputs quantized too
    run w8a8_50_n1000 $QC bench quality --variants fp32,quant-uniform,quant-tap,quant-tap-condq \
        --bits w8a8 --steps 50 --n 1000 --fp250 --threads 2 --out "$OUT/w8a8_50_n1000.json"
    run w4a8_50_n1000 $QC bench quality --variants quant-uniform,quant-tap \
        --bits w4a8 --cache interval=3 --steps 50 --n 1000 --threads 2 --out "$OUT/w4a8_50_n1000.json"
    run ablation_table_50_n1000 $PY benchmarks/ablation_table.py "$OUT/w8a8_50_n1000.json" "$OUT/w4a8_50_n1000.json"
    run w8a8_50 $QC bench quality --variants fp32,quant-uniform,quant-tap,cache-i2,qc-uniform,qc-uniform-vc,qc-uniform-vcvar,qc-tap,qc-tap-vc,qc-tap-vcvar,qc-kmeans,qc-dbscan,qc-agglomerative \
        --bits w8a8 --steps 50 --n 2000 --fp250 --threads 2 --out "$OUT/w8a8_50.json"
    run w4a8_50 $QC bench quality --variants quant-uniform,quant-tap,cache-i3,qc-uniform,qc-uniform-vc,qc-uniform-vcvar,qc-tap,qc-tap-vc,qc-tap-vcvar \
        --bits w4a8 --cache interval=3 --steps 50 --n 2000 --threads 2 --out "$OUT/w4a8_50.json"
    run w8a8_100 $QC bench quality --variants fp32,quant-uniform,cache-i2,qc-uniform,qc-tap,qc-tap-vc,qc-tap-vcvar \
        --bits w8a8 --steps 100 --n 2000 --fp250 --threads 2 --out "$OUT/w8a8_100.json"
    run w4a8_100 $QC bench quality --variants quant-uniform,cache-i3,qc-uniform,qc-uniform-vcvar,qc-tap,qc-tap-vcvar \
        --bits w4a8 --cache interval=3 --steps 100 --n 2000 --threads 2 --out "$OUT/w4a8_100.json"
    run cache_policies $QC bench quality --variants fp32,cache-i2,cache-i3,cache-adaptive-0.1,cache-adaptive-0.3,cache-static-0.2 \
        --n 1000 --steps 50 --threads 2 --out "$OUT/cache_policies.json"
    run ablation_table_50 $PY benchmarks/ablation_table.py "$OUT/w8a8_50.json" "$OUT/w4a8_50.json"
    run ablation_table_100 $PY benchmarks/ablation_table.py --steps 100 "$OUT/w8a8_100.json" "$OUT/w4a8_100.json"
    $PY benchmarks/plot_ablation.py "$OUT/w8a8_50.json" "$OUT/w4a8_50.json" --out docs/fid_vs_speed.png
    run diagnostics_w8a8 $PY benchmarks/diagnostics.py --threads 2 --bits w8a8 --cache interval=2 --out docs \
        --json "$OUT/diagnostics_w8a8_cache2_50steps.json"
    run diagnostics_w4a8 $PY benchmarks/diagnostics.py --threads 2 --bits w4a8 --cache interval=3 --out docs \
        --json "$OUT/diagnostics_w4a8_cache3_50steps.json"
    run demo $QC demo --out-dir out --threads 2
    cp out/demo*.json "$OUT/"  # the demo's metrics, beside the other tables
fi

if [[ $what == all || $what == mmdit ]]; then
    # mmdit-mnist (SD3Transformer2DModel, flow matching, 90 attribute prompts; guidance 3): the Q&C ablation
    # at W8A8, W4A8 and W4A4, 28 Euler steps (and 50 at W8A8), 2,000 samples, with attribute accuracy
    MM="$QC bench quality --model mmdit-mnist --cfg 3 --n 2000 --threads 2"
    run mmdit_w8a8_28 $MM --steps 28 --bits w8a8 --cache interval=2 \
        --variants fp32,quant-uniform,quant-tap,cache-i2,cache-fbc-0.05,cache-fbc-0.1,qc-uniform,qc-uniform-vcvar,qc-tap,qc-tap-vcvar \
        --out "$OUT/mmdit_w8a8_28.json"
    run mmdit_w4a8_28 $MM --steps 28 --bits w4a8 --cache interval=3 \
        --variants cache-i3,quant-tap,qc-uniform,qc-uniform-vcvar,qc-tap,qc-tap-vcvar \
        --out "$OUT/mmdit_w4a8_28.json"
    run mmdit_w4a4_28 $MM --steps 28 --bits w4a4 --cache interval=2 \
        --variants quant-tap,quant-tap-gptq-bal-lr16,qc-tap-gptq-bal-lr16-vcvar \
        --out "$OUT/mmdit_w4a4_28.json"
    run mmdit_w8a8_50 $MM --steps 50 --bits w8a8 --cache interval=2 --variants fp32,quant-tap,cache-i2,qc-tap-vcvar \
        --out "$OUT/mmdit_w8a8_50.json"
    # W4A8 again with FP32 in the run: the fidelity columns (each sample against FP32's from the same noise)
    run mmdit_w4a8_28_fidelity $MM --steps 28 --bits w4a8 --cache interval=3 \
        --variants fp32,cache-i3,quant-tap,qc-tap,qc-tap-vcvar --out "$OUT/mmdit_w4a8_28_fidelity.json"
    run mmdit_ablation_28 $PY benchmarks/ablation_table.py --steps 28 "$OUT/mmdit_w8a8_28.json" "$OUT/mmdit_w4a8_28.json" \
        "$OUT/mmdit_w4a4_28.json"
    $PY benchmarks/plot_ablation.py --steps 28 --title "Q&C ablation on mmdit-mnist (SD3 MMDiT, 28 steps)" \
        "$OUT/mmdit_w8a8_28.json" "$OUT/mmdit_w4a8_28.json" "$OUT/mmdit_w4a4_28.json" --out docs/mmdit_fid_vs_speed.png
    # the quality runs time each row once; interleaved rounds separate the speed from the machine's drift
    run mmdit_sampling_speed $PY benchmarks/sampling_speed.py --model mmdit-mnist --steps 28 --cfg 3 --n 100 \
        --repeats 5 --variants fp32,quant-tap,cache-i2,cache-fbc-0.1,qc-tap,qc-tap-vcvar \
        --json "$OUT/mmdit_sampling_speed.json"
fi
