"""Are a refactor's compiled models the same models? Compile the embedded model with the same passes
in this checkout and in an older one, sample the same labels from the same noise, compare bit for bit.

    git worktree add /tmp/old <rev>
    .venv/bin/python scripts/regression_check.py --old /tmp/old

The schedules are Q&C W8A8 with cache interval 2 (TAP + VC) and W4A8 with TAP, each lowered to torch
INT8 and run as the fake-quant reference: 8 sampling runs of 20 samples, 50 DDPM steps, cfg 1.5.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import sys, torch
import qc_compiler as qc
from qc_compiler.passes import TAPCalibration, Quantize
from qc_compiler.presets import qandc
torch.set_num_threads(2)
try:
    from qc_compiler.specs import StepCacheConfig
    q = qandc(bits="w8a8", cache=StepCacheConfig(interval=2), size=200, pool_labels=8)
except ImportError:  # the first release's preset took the interval as an int
    q = qandc("w8a8", cache=2, size=200, pool_labels=8)
model, sampler = qc.load_model("dit-mnist"), qc.DDPM(steps=50, cfg_scale=1.5)
variants = {"qandc_w8a8_i2": q, "w4a8_tap": [TAPCalibration(size=200, pool_labels=8), Quantize(preset="w4a8")]}
out = {}
for name, passes in variants.items():
    for backend in ("torch", "fakequant"):
        cm = qc.compile(model, passes=passes, sampler=sampler, backend=backend)
        out[f"{name}_{backend}"] = sampler.sample(cm, list(range(10)) * 2, seed=0)
torch.save(out, sys.argv[1])
'''


def run(checkout: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-c", CHILD, str(out)], check=True, env={"PYTHONPATH": str(checkout),
                   "PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()}, capture_output=True)


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="an older checkout (e.g. a git worktree)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    run(args.old.resolve(), tmp / "old.pt")
    run(Path(__file__).resolve().parents[1], tmp / "new.pt")
    old, new = torch.load(tmp / "old.pt", weights_only=True), torch.load(tmp / "new.pt", weights_only=True)
    result = {k: {"identical": bool(torch.equal(old[k], new[k])), "max_abs_diff": float((old[k] - new[k]).abs().max())}
              for k in old}
    print(json.dumps(result, indent=1))
    return 0 if all(r["identical"] for r in result.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
