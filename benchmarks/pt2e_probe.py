"""Whether torchao's PT2E (X86InductorQuantizer) quantizes a DiT with this torch: exit 0 and the number of
activation quantizers, or exit 1 and why. A torchao release paired with another torch can match nothing
and leave a float model (seen: torchao 0.18 on torch 2.11), so a machine's run picks its torchao with it
(benchmarks/gpu_host_check.sh tries each carried wheel).

    python benchmarks/pt2e_probe.py
"""
from __future__ import annotations

import sys

import torch

from qc_compiler.tools import baselines
from qc_compiler.tools.bench import benchmark_inputs, benchmark_model


def main() -> int:
    try:
        import torchao
        version = torchao.__version__
    except ImportError:
        print("pt2e_probe: torchao is not installed (pip install 'qc-compiler[bench]')")
        return 1
    model = benchmark_model("DiT-T/4")
    inputs = benchmark_inputs(model, 2)
    try:
        converted = baselines.pt2e_convert(model, inputs, [inputs])
    except Exception as e:  # noqa: BLE001 - the probe's answer is the reason
        print(f"pt2e_probe: torch {torch.__version__}, torchao {version}: {type(e).__name__}: {str(e).splitlines()[0]}")
        return 1
    n = baselines.check_quantized(converted, "PT2E")
    print(f"pt2e_probe: torch {torch.__version__}, torchao {version}: {n} activation quantizers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
