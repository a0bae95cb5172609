"""The Q&C ablation on the embedded model (= ``qc bench ablation``): FP, quant only, cache only, naive
quant+cache, +VC, +TAP, +TAP+VC, and TAP swapped for k-means, DBSCAN and agglomerative clustering.

    python benchmarks/ablation.py --bits w8a8,w4a8 --steps 50,100 --n 2000 --fp250 --out out/ablation.json
"""
import sys

from qc_compiler.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ablation", *sys.argv[1:]]))
