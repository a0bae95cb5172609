"""Deliberate mutations of the method, one at a time, each in a copy of the repository: the suite
must fail for every one. Prints which test failed first.

    .venv/bin/python scripts/mutations.py            # all (about 25 minutes on 2 cores)
    .venv/bin/python scripts/mutations.py 0 2        # some, by index

A mutation that no test catches is a hole in the tests: write the test, then keep the mutation here.
"""
import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = Path(tempfile.gettempdir()) / "qc-mutations" / "copy"
PY = str(REPO / ".venv/bin/python")

MUTATIONS = [
    ("vc: sample-placement targets one step early", "qc_compiler/passes/vc.py",
     "return [r.x_t for r in traj.steps[1:]] + [traj.samples]", "return [r.x_t for r in traj.steps]"),
    ("vc: rescale around 0, not the per-sample mean", "qc_compiler/specs.py",
     "mu = x.mean(dim=dims, keepdim=True)", "mu = torch.zeros_like(x.mean(dim=dims, keepdim=True))"),
    ("tap: selector replaced by a random draw", "qc_compiler/calibration/selectors.py",
     '''    labels = tap_clusters(features, steps, TAPConfig(**options), seed=seed)
    return draw_per_cluster(labels, _positive("size", size), seed)''',
     '''    TAPConfig(**options)
    return select_random(features, steps, size, seed)'''),
    ("vc: variance form without the square root", "qc_compiler/passes/vc.py",
     "(spread_ref / spread_hat.clamp_min(1e-30)).sqrt()", "(spread_ref / spread_hat.clamp_min(1e-30))"),
    ("cache: interval schedule off by one", "qc_compiler/specs.py",
     "return step % self.interval == 0", "return step % self.interval == 1"),
    ("quant: per-step groups collapse to group 0", "qc_compiler/quant/spec.py",
     "return min(num_groups - 1, step * num_groups // max(1, num_steps))", "return 0"),
    ("int8: activation codes floor instead of round-half-even", "qc_compiler/backends/torch_int8.py",
     "x.div(scale).round_()", "x.div(scale).floor_()"),
    ("persist: file hashes not checked", "qc_compiler/persist.py",
     "if sha256_file(path) != digest:", "if False:"),
    ("tune: the slowest schedule within the bounds is chosen", "qc_compiler/tune.py",
     'return max(ok, key=lambda r: (r["speed"], -r["fid_increase"]))',
     'return min(ok, key=lambda r: (r["speed"], -r["fid_increase"]))'),
    ("tune: the proxy compares a candidate with itself", "qc_compiler/tune.py",
     "for s, r in zip(traj.steps, ref.outputs)", "for s, r in zip(traj.steps, [s.model_output for s in traj.steps])"),
    ("tune: a rerun ignores its log", "qc_compiler/tune.py",
     'done = book.find("proxy", c.key())', "done = None"),
    ("inductor: sample-placement VC dropped", "qc_compiler/backends/inductor.py",
     'self.meta = {"qc.sample_hooks": list(graph.meta.get("qc.sample_hooks", []))}', "self.meta = {}"),
    ("int8: no activation split without VNNI", "qc_compiler/backends/torch_int8.py",
     "and int(self.w_int8.abs().max()) > SATURATING_WEIGHT_CODE)", "and False)"),
    ("persist: manifest digest not checked", "qc_compiler/persist.py",
     'if manifest.get("digest") != _digest(manifest):', "if False:"),
    ("onnx: file digest not checked", "qc_compiler/backends/onnx.py",
     "if verify and meta.get(_DIGEST) != _metadata_digest(model) and (\n"
     "                _weight_bytes(model) >= PROTOBUF_LIMIT // 2 or meta.get(_DIGEST) != _legacy_digest(model)):",
     "if False:"),
    ("metrics: FID drops the covariance cross term", "qc_compiler/eval/metrics.py",
     "- 2.0 * trace_sqrt_product(sigma1, sigma2))", ")"),
    ("step: step 0 does not start a new run", "qc_compiler/step.py",
     "            if self.step != 0 or self.stream in self._started:\n                self.reset()",
     "            if False:\n                self.reset()"),
    ("distributed: shards ignore the label list", "qc_compiler/distributed.py",
     '"labels": labels_digest, "model": model_id}', '"model": model_id}'),
    ("quant: conditioning linears not weight-only", "qc_compiler/quant/config.py",
     "weight_only=adapter.conditioning_linears if self.weight_only is None else self.weight_only",
     "weight_only=() if self.weight_only is None else self.weight_only"),
    ("onnx runner: cache decision ignores the schedule", "qc_compiler/backends/onnx.py",
     'feed[f"compute_{r}"] = np.array(self.schedule.decide(state.step, r, r in store, store))',
     'feed[f"compute_{r}"] = np.array(True)'),
    ("fit: fitted state reused whatever the schedule", "qc_compiler/api.py",
     "if fitted and fitted.get(SCHEDULE_KEY) != schedule:", "if False:"),
    ("step: one cache stream for every named call (cond and uncond mix)", "qc_compiler/step.py",
     "return self._stores.setdefault((self.stream, owner), {})", 'return self._stores.setdefault(("", owner), {})'),
    ("text families: attention masks not passed to the transformer", "qc_compiler/models/diffusers_text.py",
     "if n not in self.unused}", 'if n not in self.unused and "mask" not in n}'),
    ("flux: timestep not divided as its pipeline divides it", "qc_compiler/models/adapters/flux.py",
     'timestep_dtype="float32", timestep_divisor=1000)', 'timestep_dtype="float32", timestep_divisor=1)'),
    ("gptq: a column's error is not moved onto the columns after it", "qc_compiler/quant/gptq.py",
     "            block[:, i:] -= err @ hblock[i:i + 1, i:]\n", ""),
    ("gptq: no lazy update of the columns after a block", "qc_compiler/quant/gptq.py",
     "        w[:, hi:] -= errors @ hinv[lo:hi, hi:]", "        pass"),
    ("balance: ptq4dit favours the steps aligned with the weight", "qc_compiler/quant/balance.py",
     "eta = torch.softmax(-rho, dim=0)", "eta = torch.softmax(rho, dim=0)"),
    ("int8: a balanced input quantized with the scalar scale", "qc_compiler/backends/torch_int8.py",
     "qscale = scale if channel is None else channel * scale", "qscale = scale"),
    ("int8: the low-rank branch is dropped", "qc_compiler/backends/torch_int8.py",
     "        if self.spec.low_rank is not None:  # SVDQuant's float branch on the raw input",
     "        if False:  # SVDQuant's float branch on the raw input"),
    ("quant: observers see the unbalanced input", "qc_compiler/quant/fake_quant.py",
     "xb = self._balanced(x)\n            self.observe(xb)", "xb = x\n            self.observe(xb)"),
    ("mmdit-mnist: slant measured with the wrong sign", "qc_compiler/models/digit_text.py",
     "return w.mean(1), -mu11 / mu02.clamp(min=1e-6)", "return w.mean(1), mu11 / mu02.clamp(min=1e-6)"),
    ("mmdit-mnist: the pipeline gets no negative (empty) prompt under guidance", "qc_compiler/models/mmdit_mnist.py",
     "    if guidance_scale > 1:\n        neg", "    if False:\n        neg"),
    ("mmdit-mnist: pooled text embedding averages the padding too", "qc_compiler/models/digit_text.py",
     "pooled = (emb * real).sum(1) / real.sum(1).clamp(min=1.0)", "pooled = emb.mean(1)"),
    ("fidelity: each sample scored against itself, not FP32's", "qc_compiler/eval/suite.py",
     '"rmse_vs_fp32": float((a.double() - b.double())', '"rmse_vs_fp32": float((a.double() - a.double())'),
    ("sequential GPTQ: the layers before the current one left in float", "qc_compiler/passes/quantize.py",
     'only={id(m): "hessian", **{id(o): "quant" for o in order[:i]}}', 'only={id(m): "hessian"}'),
    ("sequential GPTQ: the Hessian of the raw input, not of the input on its grid", "qc_compiler/quant/fake_quant.py",
     "self._hessian.update(self._quantized_input(x), target)", "self._hessian.update(x, target)"),
    ("float-target GPTQ: W' never formed (codes fitted to the layer's own output)", "qc_compiler/quant/fake_quant.py",
     "w = float_target_weight(w, self._hessian.cross(), h, self.gptq.damp)", "w = w"),
    ("float-target GPTQ: the 'float' inputs gathered with the layers before already quantized",
     "qc_compiler/passes/quantize.py", 'run("float", batches, only={id(m): "target"})',
     'run("float", batches, only={id(m): "target", **{id(o): "quant" for o in order[:i]}})'),
    ("BRECQ: the soft forward uses the fixed round-to-nearest weight (nothing learned)",
     "qc_compiler/quant/fake_quant.py",
     "weight = soft_weight(self._soft_base, self.w_scale[:, None], self._v, self.spec.weight_bits)",
     "weight = self.w_fq + 0 * self._v.sum()"),
    ("BRECQ: learned codes read the wrong side of one half", "qc_compiler/quant/brecq.py",
     "(_h(v.detach()) > 0.5)", "(_h(v.detach()) < 0.5)"),
    ("BRECQ: minibatches never mix timesteps", "qc_compiler/passes/quantize.py",
     "inputs = pooled(env_q, s.inputs) if len(batches) > 1 and not steps_read else None", "inputs = None"),
    ("BRECQ: learned codes kept even where they measure worse than round to nearest",
     "qc_compiler/passes/quantize.py", "if not after < before:  # hard", "if False:  # hard"),
    ("BRECQ at A4: LSQ's step gradient loses its -x/s term", "qc_compiler/quant/brecq.py",
     "t = x.detach() / scale\n", "t = x.detach() / scale.detach()\n"),
    ("BRECQ at A4: a block that measured worse keeps its learned low-rank branch", "qc_compiler/passes/quantize.py",
     "            m.set_branch(*start[\"branch\"][id(m)])", "            pass"),
    ("per token: the INT8 kernel adds the zero-point correction instead of subtracting it",
     "qc_compiler/backends/torch_int8.py", "self.w_sum_scaled, alpha=-1.0)", "self.w_sum_scaled, alpha=1.0)"),
    ("per token: the fake-quant reference falls back to the calibrated per-tensor range",
     "qc_compiler/quant/fake_quant.py", "        if self.per_token:  # each token's own range", "        if False:  # each token's own range"),
    ("per token: each row's range not widened to include 0", "qc_compiler/quant/qparams.py",
     "lo = xf.amin(dim=-1, keepdim=True).clamp_(max=0.0)", "lo = xf.amin(dim=-1, keepdim=True)"),
    ("per token: the balance search scores its candidates per tensor", "qc_compiler/quant/fake_quant.py",
     "weight_observer=self.spec.weight_observer, per_token=self.per_token))",
     "weight_observer=self.spec.weight_observer, per_token=False))"),
    ("weight-only: the input split into two int8 levels, not three (2^-16 of its range)",
     "qc_compiler/quant/weight_only.py", "LEVELS = 3", "LEVELS = 2"),
    ("attention: the two-matmul kernel ignores the mask", "qc_compiler/blocked_attention.py",
     "return torch.matmul((scores if mask is None else scores + mask).softmax(-1), v)",
     "return torch.matmul(scores.softmax(-1), v)"),
    ("attention: the blocks read the mask's first rows, not their own", "qc_compiler/blocked_attention.py",
     "scores = torch.baddbmm(block[:, r:r + qb], qh, kt, alpha=scale)",
     "scores = torch.baddbmm(block[:, :qh.shape[1]], qh, kt, alpha=scale)"),
    ("attention: the blocks' lengths not balanced", "qc_compiler/blocked_attention.py",
     "    return math.ceil(total / blocks)", "    return max(1, min(most, total))"),
    ("attention: every score held at once at any size", "qc_compiler/specs.py",
     "<= WHOLE_SCORES_MAX_MIB * 2 ** 20:", "<= float('inf'):"),
    ("attention: the blocked op's gradients ignore the mask", "qc_compiler/blocked_attention.py",
     "out = plain_attention(q, k, v, attn_mask, is_causal, scale)", "out = plain_attention(q, k, v, None, is_causal, scale)"),
    ("attention: auto picks the fused kernel without AMX", "qc_compiler/passes/attention.py",
     'return "matmul" if model_device(gm).type == "cpu" and not cpu_has_amx_bf16() else "sdpa"', 'return "sdpa"'),
]


def copy_repo():
    if COPY.exists():
        shutil.rmtree(COPY)
    COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO, COPY, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "out", "runs", ".pytest_cache"))


def main(which=None, out=None):
    results = []
    for i, (name, path, old, new) in enumerate(MUTATIONS):
        if which is not None and i not in which:
            continue
        copy_repo()
        f = COPY / path
        src = f.read_text()
        assert src.count(old) == 1, (name, src.count(old))
        f.write_text(src.replace(old, new))
        t0 = time.time()
        proc = subprocess.run([PY, "-m", "pytest", "-x", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                               "-o", "addopts=--doctest-modules", "--tb=no", "-rf"],
                              cwd=COPY, env={"PYTHONPATH": str(COPY), "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
                              capture_output=True, text=True, timeout=900)
        failed = [l for l in proc.stdout.splitlines() if l.startswith("FAILED")]
        caught = proc.returncode != 0
        results.append({"mutation": name, "caught": caught, "by": failed[0][7:] if failed else proc.stdout[-300:],
                        "seconds": round(time.time() - t0)})
        print(json.dumps(results[-1]), flush=True)
        if out:  # after every mutation, so a run stopped early keeps what it measured
            tmp = Path(f"{out}.tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(out)
    missed = [r["mutation"] for r in results if not r["caught"]]
    print(f"{len(results) - len(missed)} of {len(results)} mutations caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", nargs="*", type=int, help="mutation indices (default: all)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    raise SystemExit(main(set(args.which) or None, args.out))
