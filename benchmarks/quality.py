"""Quality of compiled variants against FP32, same seeds, same step count, one run (= ``qc bench quality``).

    python benchmarks/quality.py --variants fp32,quant-uniform,quant-tap,w4a8-uniform,w4a8-tap --n 1000
    python benchmarks/quality.py --variants fp32,cache-i2,cache-i3,cache-adaptive-0.1,cache-adaptive-0.3 --n 1000
"""
import sys

from qc_compiler.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "quality", *sys.argv[1:]]))
