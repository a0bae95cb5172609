"""Smoke tests: the speed benchmarks run end to end on a tiny DiT and print complete tables.

They time nothing that is asserted (timings are never asserted in a test); they keep the scripts
from rotting between the long runs that fill docs/RESULTS.md.
"""
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # whole-program runs

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gemm_peak_times_every_kernel_on_the_block_shapes(capsys, tmp_path):
    import json

    gemm_peak = load("gemm_peak")
    gemm_peak.main(gemm_peak.parse_args(["--model", "DiT-T/4", "--batch", "2", "--threads", "1", "--repeats", "1",
                                         "--json", str(tmp_path / "g.json")]))
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "ISA " in out.splitlines()[0]  # every table says where it ran
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["benchmark"] == "gemm_peak" and saved["machine"]["cpu"] and len(saved["rows"]) >= 6
    assert "M = 2 x 64 = 128 rows" in out and "qkv 64->192" in out and "fc2 256->64" in out
    for kernel in ("FP32 F.linear", "bf16 F.linear", "qlinear_pointwise", "torch._int_mm"):
        assert kernel in out
    assert "Fastest INT8 path" in out
    assert "Weight-only conditioning linear (64->384, 4 rows)" in out and "cached dequantized copy" in out


def test_profile_forward_labels_our_gemms_for_either_kernel(capsys, monkeypatch, tmp_path):
    import json

    profile_forward = load("profile_forward")
    from qc_compiler.backends import torch_int8
    monkeypatch.setattr(torch_int8, "_quantize_u8", torch_int8._quantize_u8)  # undo the instrumentation afterwards
    monkeypatch.setattr(torch_int8, "KERNELS", dict(torch_int8.KERNELS))
    monkeypatch.setenv("QC_INT8_KERNEL", "onednn")  # the script sets it; this restores it afterwards
    for kernel in ("onednn", "int_mm"):
        profile_forward.main(profile_forward.parse_args(["--model", "DiT-T/4", "--batch", "2", "--threads", "1",
                                                         "--forwards", "1", "--kernel", kernel,
                                                         "--json", str(tmp_path / f"{kernel}.json")]))
        out = capsys.readouterr().out
        tables = out.split("### ")[1:]
        assert f"INT8 kernel {kernel}" in out
        assert [t.split(":")[0] for t in tables] == ["eager FP32", "ours W8A8 torch INT8"]
        assert "INT8 GEMMs" in tables[1] and "INT8 GEMMs" not in tables[0] and "Amdahl" in out
        saved = json.loads((tmp_path / f"{kernel}.json").read_text())
        assert saved["kernel"] == kernel and saved["machine"]["cpu"]
        ours = saved["ours_w8a8_torch_int8"]
        assert any(k.startswith("INT8 GEMMs") for k in ours["shares_s"])  # the table's rows, as numbers
        assert sum(ours["shares_s"].values()) >= ours["wall_s"] * 0.999  # the rest row closes the sum
        assert ours["shares_s"][next(k for k in ours["shares_s"] if k.startswith("INT8"))] == saved["int8_gemm_s"]


def test_cache_speed_warms_up_at_the_timed_batch_and_times_three_runs(capsys, tmp_path, monkeypatch):
    import json

    import qc_compiler as qc

    cache_speed = load("cache_speed")
    with pytest.raises(SystemExit, match="at least 3"):
        cache_speed.main(cache_speed.parse_args(["--repeats", "2"]))
    calls, real_sample = [], qc.DDPM.sample

    def sample(self, model, labels, seed=0, **kw):
        calls.append((len(labels), seed))
        return real_sample(self, model, labels, seed=seed, **kw)

    monkeypatch.setattr(qc.DDPM, "sample", sample)
    cache_speed.main(cache_speed.parse_args(["--models", "DiT-T/4", "--steps", "4", "--batch", "3", "--repeats", "3",
                                             "--threads", "1", "--json", str(tmp_path / "c.json")]))
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == list(cache_speed.POLICIES)
    assert calls == [(3, 0), (3, 0), (3, 1), (3, 2)] * len(rows)  # one warm-up at the timed batch, then 3 runs
    assert all(len(r["times_s"]) == 3 and r["median_s"] == sorted(r["times_s"])[1] for r in rows)
    assert rows[0]["block_flops_skipped"] == 0 and rows[0]["speedup"] == 1
    assert 0.3 < rows[1]["block_flops_skipped"] < 0.7  # interval 2 skips about half the blocks' work
    assert "| DiT-T/4 | interval 3 |" in capsys.readouterr().out


def test_forward_speed_prints_every_row_with_its_error(capsys, monkeypatch):
    import onnxruntime.quantization as oq

    forward_speed = load("forward_speed")
    # quantize_static must calibrate on exactly our calibration set (trajectory items, every timestep)
    ours_items, static_items, real_static, real_batches = [], [], oq.quantize_static, forward_speed.calibration_batches

    def batches(ours, batch):
        ours_items.append(ours.build["fitted"]["calibration.set.x"].shape[0])
        return real_batches(ours, batch)

    def spy_static(model_in, model_out, reader, *a, **kw):
        items = list(iter(reader.get_next, None))
        static_items.append(sum(item["x"].shape[0] for item in items))

        class Replay(oq.CalibrationDataReader):
            def __init__(self):
                self.it = iter(items)

            def get_next(self):
                return next(self.it, None)

        return real_static(model_in, model_out, Replay(), *a, **kw)

    monkeypatch.setattr(forward_speed, "calibration_batches", batches)
    monkeypatch.setattr(oq, "quantize_static", spy_static)
    # the compiled baselines compile for minutes: benchmarks/test_speed.py runs them (--benchmark-only)
    forward_speed.main(forward_speed.parse_args(["--models", "DiT-T/4", "--batch", "2", "--repeats", "1",
                                                 "--steps", "3", "--threads", "1", "--no-compiled",
                                                 "--e2e-only", "torch INT8, ONNX INT8 + cache"]))
    out = capsys.readouterr().out
    per_forward, e2e = out.split("end to end")
    for row in ("PyTorch eager FP32 |", "onnxruntime FP32 |", "onnxruntime quantize_dynamic |",
                "onnxruntime quantize_dynamic per-channel |", "onnxruntime quantize_static (QDQ), MatMul/Gemm only |",
                "onnxruntime quantize_static (QDQ) |", "torch.ao dynamic INT8 |", "ours W8A8 torch INT8 |",
                "ours W8A8 ONNX INT8 (onnxruntime) |"):
        assert row in per_forward
    assert "failed" not in out
    assert ours_items and ours_items[0] > 0 and static_items == [ours_items[0]] * 2  # default op types, MatMul only
    rows = [line for line in e2e.splitlines() if line.startswith("| ") and "s / run" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [  # --e2e-only: the reference and the rows asked for
        "eager FP32", "ours W8A8 torch INT8", "ours W8A8 torch INT8 + cache interval 2",
        "ours W8A8 ONNX INT8 + cache interval 2"]
    # Our INT8 rows carry a real, small error against FP32 (not 0: the weights are int8).
    ours = next(line for line in per_forward.splitlines() if line.startswith("| ours W8A8 torch INT8 |"))
    assert 0 < float(ours.rstrip(" |").split("|")[-2]) < 0.2  # the error column, before the first call's seconds


def test_forward_speed_no_forward_runs_only_the_end_to_end_rows_asked_for(capsys):
    forward_speed = load("forward_speed")
    forward_speed.main(forward_speed.parse_args(["--models", "DiT-T/4", "--batch", "2", "--repeats", "1",
                                                 "--steps", "3", "--threads", "1", "--no-compiled", "--no-forward",
                                                 "--e2e-only", "torch INT8 + cache"]))
    out = capsys.readouterr().out
    assert "per forward" not in out and "failed" not in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "s / run" not in line]
    assert [r[0][2:] for r in rows] == ["eager FP32", "ours W8A8 torch INT8 + cache interval 2"]
    assert 0 < float(rows[1][-1].rstrip(" |")) < 0.5  # the cached INT8 samples against eager FP32's
    # without the reference: the asked row alone, with no ratio or error to eager FP32 to give
    forward_speed.main(forward_speed.parse_args(["--models", "DiT-T/4", "--batch", "2", "--repeats", "1",
                                                 "--steps", "3", "--threads", "1", "--no-compiled", "--no-forward",
                                                 "--e2e-no-reference", "--e2e-only", "=ours W8A8 torch INT8"]))
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "s / run" not in line]
    assert [r[0][2:] for r in rows] == ["ours W8A8 torch INT8"]  # '=': that label, not its cached twin
    assert rows[0][2] == "-" and rows[0][-1] == "- |"
    with pytest.raises(SystemExit):  # nothing left to run
        forward_speed.parse_args(["--no-forward", "--no-e2e"])
    # other latents (longer sequences): the heading says so, and the model is built at that size
    forward_speed.main(forward_speed.parse_args(["--models", "DiT-T/4", "--batch", "2", "--repeats", "1",
                                                 "--steps", "2", "--threads", "1", "--no-compiled", "--no-forward",
                                                 "--e2e-no-reference", "--e2e-only", "=ours W8A8 torch INT8",
                                                 "--input-size", "16"]))
    assert "### DiT-T/4 on 16x16 latents, end to end" in capsys.readouterr().out
    from qc_compiler.tools.bench import benchmark_model
    assert benchmark_model("DiT-T/4", 16).pos_embed.shape[1] == 16  # (16 / 4) ** 2 tokens, not 64
    for bad in (["--input-size", "12"], ["--input-size", "64", "--models", "dit-mnist"]):
        with pytest.raises(SystemExit):
            forward_speed.parse_args(bad)


def test_forward_speed_build_s_builds_nothing_past_its_time_box_and_lists_what_it_left(capsys, monkeypatch):
    from qc_compiler.cpu import cpu_has_amx_bf16

    forward_speed = load("forward_speed")
    real = forward_speed.compile_benchmark_w8a8

    def no_inductor(model, sampler, *args, backend="torch", **kw):  # the torch lowering stands in (no compile)
        built = real(model, sampler, *args, **kw)
        built.graph_module.first_call_s = 0.0
        return built

    monkeypatch.setattr(forward_speed, "compile_benchmark_w8a8", no_inductor)
    monkeypatch.setattr(forward_speed, "WHOLE_SCORES_MAX_MIB", 0)  # scores "past" it: the blocks' A/B row too
    forward_speed.main(forward_speed.parse_args(["--models", "DiT-T/4", "--batch", "2", "--repeats", "1",
                                                 "--steps", "3", "--threads", "1", "--no-e2e", "--no-ort",
                                                 "--build-s", "0.001"]))
    rows = [line.split(" | ")[0][2:] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    late = [r.split(":")[0] for r in rows if r.endswith("past --build-s 0.001")]
    pt2e = "torchao PT2E X86InductorQuantizer static INT8 + torch.compile"
    # the one picked here first, the other, then the matmuls with every score at once (the blocks' A/B)
    kernels = ["two matmuls", "fused SDPA"][::-1 if cpu_has_amx_bf16() else 1] + ["two matmuls, all scores at once"]
    assert late == [f"ours W8A8 Inductor INT8, bf16 attention ({k})" for k in kernels] + ["torch.compile bf16 autocast", pt2e,
                    f"{pt2e}, our layers", "torch.compile FP32", "torchao dynamic INT8 + torch.compile",
                    "ours W8A8 Inductor INT8, every linear (as PT2E all layers)"]
    assert "ours W8A8 Inductor INT8" in rows  # ours, built before the box is looked at, is timed


def test_build_all_builds_only_the_baselines_asked_for():
    from qc_compiler.tools.baselines import build_all

    asked = []
    built, failed = build_all(None, (), [], only=lambda label: asked.append(label) and False)
    assert built == [] and failed == []  # nothing built: the model (None) was never touched
    pt2e = "torchao PT2E X86InductorQuantizer static INT8 + torch.compile"
    assert asked == ["torch.compile bf16 autocast", pt2e, f"{pt2e}, our layers", "torch.compile FP32",
                     "torchao dynamic INT8 + torch.compile"]  # the goals' baselines first, by their rows' labels


def test_onnx_parity_reports_size_and_agreement(capsys, tmp_path):
    import json

    onnx_parity = load("onnx_parity")
    onnx_parity.main(onnx_parity.parse_args(["--models", "DiT-T/4", "--steps", "3", "--batch", "2", "--threads", "1",
                                             "--json", str(tmp_path / "p.json")]))
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| DiT-T/4")]
    assert [r[1] for r in rows] == ["W8A8", "W8A8 + cache interval 2"]
    for r in rows:
        assert 0 < float(r[4]) < 0.7  # int8 weights: the file is well under the FP32 one
        assert float(r[-1].rstrip(" |")) < 1e-3  # onnxruntime follows the torch INT8 run
    assert float(rows[0][5]) < 1e-3 and float(rows[0][7]) < 1e-3 and rows[1][5] == rows[1][7] == "-"
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["machine"]["cpu"] and [r["variant"] for r in saved["rows"]] == [r[1] for r in rows]
    assert f"{saved['rows'][0]['final_samples_rel']:.1e}" == rows[0][-1].rstrip(" |")  # the printed figure
    assert saved["rows"][1]["per_step_rel_worst"] is None  # cached: final samples only, as printed


def test_ort_probe_times_each_export_and_writes_its_json(capsys, tmp_path):
    import json

    ort_probe = load("ort_probe")
    ort_probe.main(["--model", "DiT-T/4", "--batch", "2", "--threads", "1", "--repeats", "1",
                    "--json", str(tmp_path / "o.json")])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "o.json").read_text())
    printed = [line for line in out.splitlines() if line.startswith("| TorchScript") or line.startswith("| dynamo")]
    assert len(saved["rows"]) == len(printed) >= 4 and saved["eager_fp32_s"] > 0
    ok = [r for r in saved["rows"] if "failed" not in r["row"]]
    assert ok and all(r["rel_error"] < 1e-4 for r in ok)  # FP32 onnxruntime agrees with eager


def test_kernel_probe_times_both_kernels_of_each_layer_and_writes_its_json(capsys, tmp_path):
    import json

    probe = load("kernel_probe")
    probe.main(probe.parse_args(["--batch", "2", "--hidden", "128", "--tokens", "16", "--layers", "2", "--threads", "1",
                                 "--repeats", "1", "--eager-only", "--block-mib", "0.0002,1",
                                 "--json", str(tmp_path / "k.json")]))
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "| INT8 GEMM on the codes, eager |" in out
    saved = json.loads((tmp_path / "k.json").read_text())
    rows = {r["row"]: r for r in saved["rows"]}
    assert [r["row"] for r in saved["rows"]] == [
        "float GEMM, dequantized copy, eager", "INT8 GEMM on the codes, eager", "FP32 SDPA, eager", "bf16 SDPA, eager",
        "bf16 two matmuls, all scores at once, eager", "bf16 two matmuls, blocked, eager",
        "FP32 SDPA, eager",  # the block sweep's own reference row, then one row a size
        "bf16 two matmuls, blocks of 0.0002 MiB (1 x 1 heads x 6 rows), eager",  # 209 B: 6 rows of 16 keys' scores
        "bf16 two matmuls, blocks of 1 MiB (2 x 2 heads x 16 rows), eager"]
    assert 0 < rows["INT8 GEMM on the codes, eager"]["rel_err"] < 1e-4  # the split input: weight-only numerics
    for row in ("bf16 two matmuls, all scores at once, eager", "bf16 two matmuls, blocked, eager",
                "bf16 two matmuls, blocks of 0.0002 MiB (1 x 1 heads x 6 rows), eager"):
        assert 1e-4 < rows[row]["rel_err"] < 2e-2  # bf16's rounding, and no more
    assert rows["FP32 SDPA, eager"]["rel_err"] == 0 and all(r["ms"] > 0 for r in saved["rows"])


def test_a_pt2e_graph_that_quantized_nothing_is_refused_not_timed():
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed
    from qc_compiler.tools.baselines import check_quantized

    class Quantized(torch.nn.Module):
        def forward(self, x):
            q = torch.ops.quantized_decomposed.quantize_per_tensor.default(x, 0.1, 0, -128, 127, torch.int8)
            return torch.ops.quantized_decomposed.dequantize_per_tensor.default(q, 0.1, 0, -128, 127, torch.int8)

    assert check_quantized(torch.fx.symbolic_trace(Quantized()), "PT2E") == 1
    with pytest.raises(RuntimeError, match="PT2E quantized no activation .*torch .*torchao"):
        check_quantized(torch.fx.symbolic_trace(torch.nn.Linear(4, 4)), "PT2E")  # float, nothing matched


@pytest.mark.skipif((os.cpu_count() or 0) >= 7, reason="this machine has the cores for the lanes: it would run them")
def test_gpu_host_check_refuses_a_machine_too_small_for_its_lanes(tmp_path):
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_host_check.sh"
    done = subprocess.run(["bash", str(script)], env={**os.environ, "OUT": str(tmp_path)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "needs at least 7 physical cores" in done.stdout
    assert list(tmp_path.iterdir()) == []  # refused before any work or output


def test_pt2e_probe_says_whether_pt2e_quantizes_here(capsys):
    code = load("pt2e_probe").main()
    out = capsys.readouterr().out
    try:
        import torchao  # noqa: F401 - the bench extra, not installed by make
    except ImportError:
        assert code == 1 and "torchao is not installed" in out
        return
    assert code == 0 and int(out.split(": ")[-1].split()[0]) > 0, out  # torch 2.13 + torchao 0.18: 15


def test_pt2e_calibration_is_rebatched_to_the_exported_batch():
    from qc_compiler.tools.baselines import _rebatch

    items = [(torch.full((2, 3), float(i)), torch.tensor([i, i]), torch.tensor([0, 1])) for i in range(5)]
    like = (torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, dtype=torch.long))
    batches = _rebatch(items, like)  # 10 items -> two full batches of 4 (the remainder is left out)
    assert len(batches) == 2 and all(b[0].shape == (4, 3) and b[1].dtype == torch.float32 for b in batches)
    few = _rebatch(items[:1], (torch.zeros(5, 3),) + like[1:])  # 2 items, a batch of 5: repeated to fill it
    assert len(few) == 1 and few[0][0].shape == (5, 3) and set(few[0][1].tolist()) == {0.0}


def test_sampling_speed_times_variants_in_rounds_against_fp32(capsys, tmp_path):
    import json

    speed = load("sampling_speed")
    speed.main(["--model", "dit-mnist", "--variants", "fp32,cache-i2", "--steps", "4", "--n", "2", "--repeats", "3",
                "--threads", "1", "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "round 3/3" in out and "| cache-i2 (-) |" in out
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "cache-i2"]
    assert rows[0]["speed_vs_fp32"] == 1.0 and all(len(r["times"]) == 3 and r["spread"] >= 1 for r in rows)
    with pytest.raises(SystemExit):  # every speed is a ratio against FP32: a run without it is refused
        speed.parse_args(["--variants", "cache-i2"])


def test_gpu_speed_runs_every_section_and_keeps_failures_apart(capsys, tmp_path, monkeypatch):
    """benchmarks/gpu_speed.py (gpu_check.sh's table) on the CPU: every section, its rows and errors."""
    import json

    gpu_speed = load("gpu_speed")
    with pytest.raises(SystemExit):  # arguments are refused before any work
        gpu_speed.parse_args(["--ours", "int_mm,nope", "--device", "cpu"])
    with pytest.raises(SystemExit):
        gpu_speed.parse_args(["--repeats", "2", "--device", "cpu"])
    with pytest.raises(SystemExit):
        gpu_speed.parse_args(["--json", str(tmp_path / "missing" / "g.json"), "--device", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_speed.parse_args([])  # cuda is the default device
    res = gpu_speed.main(["--device", "cpu", "--model", "DiT-T/4", "--batch", "4", "--steps", "2", "--repeats", "3",
                          "--e2e-repeats", "1", "--no-compile", "--ours", "int_mm,fp8",
                          "--json", str(tmp_path / "g.json"), "--md", str(tmp_path / "g.md")])
    assert json.loads((tmp_path / "g.json").read_text()) == json.loads(json.dumps(res))
    assert not res["failures"], res["failures"]
    fwd = {r["row"]: r for r in res["forward"]}
    assert list(fwd) == ["eager FP32", "eager bf16 autocast", "ours W8A8, torch backend", "ours FP8, torch._scaled_mm"]
    assert fwd["eager FP32"]["rel_err"] == 0 and 0 < fwd["ours W8A8, torch backend"]["rel_err"] < 0.05
    assert 0 < fwd["ours FP8, torch._scaled_mm"]["rel_err"] < 0.1
    e2e = [r["row"] for r in res["e2e"]]
    assert len(e2e) == 7 and e2e[-1] == "ours FP8, torch._scaled_mm + cache i2"  # FP32 + 3 rows x (no cache, cache)
    onnx = res["onnx"][0]
    assert onnx["ms"] > 0 and onnx["rel_err"] < 0.05  # the CPU provider here; CUDA's on a GPU machine
    md = (tmp_path / "g.md").read_text()
    assert "| ours FP8, torch._scaled_mm + cache i2 |" in md and "CPUExecutionProvider" in md


def test_tap_scaling_runs_tap_and_the_exact_spectral_baseline(capsys, tmp_path):
    """The exact N x N baseline once broke silently (tap_affinity's alpha became keyword-only)."""
    import json

    tap_scaling = load("tap_scaling")
    assert tap_scaling.main(["--sizes", "300", "--dim", "16", "--clusters", "4", "--steps", "5", "--size", "20",
                             "--exact-limit", "300", "--threads", "1", "--json", str(tmp_path / "t.json")]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["tap_ari"] > 0.5 and "ARI" in rows[0]["exact"]
    assert "| 300 |" in capsys.readouterr().out


def test_diagnostics_writes_its_figures_numbers_where_asked(capsys, tmp_path, monkeypatch):
    import json

    diagnostics = load("diagnostics")
    plotted = []
    monkeypatch.setattr(diagnostics, "plot", lambda stats, png: plotted.append(png))  # matplotlib is a bench extra
    argv = ["--n", "4", "--steps", "4", "--calib-size", "16", "--pool-labels", "2", "--threads", "1",
            "--out", str(tmp_path / "png"), "--json", str(tmp_path / "d.json")]
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    with pytest.raises(SystemExit):  # refused before any sampling, not after
        diagnostics.parse_args(argv)
    stats = diagnostics.main(diagnostics.parse_args(argv + ["--no-plot"]))
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["machine"]["cpu"] and plotted == []
    assert set(saved["variance"]) == set(stats["variance"]) >= {"FP32", "cache only", "quant+cache"}
    assert saved["variance"]["FP32"]["p50"] == stats["variance"]["FP32"]["p50"]
    assert len(saved["variance"]["FP32"]["p50"]) == 4  # one band per step
    assert not (tmp_path / "png" / "diagnostics_w8a8_cache2_4steps.json").exists()  # --json moved it


def test_the_per_region_break_row_lowers_the_old_way_and_restores_the_new():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny

    import qc_compiler as qc
    from qc_compiler.backends.inductor import CachePatternModule, InductorModule
    from qc_compiler.passes import StepCache
    from qc_compiler.tools.bench import per_region_breaks

    build = lambda: qc.compile(make_tiny(), [StepCache(interval=2)], sampler=qc.DDPM(steps=3),  # noqa: E731
                               backend="inductor")  # torch.compile is lazy: nothing compiles here
    assert type(per_region_breaks(build).graph_module) is InductorModule
    assert isinstance(build().graph_module, CachePatternModule)


def test_the_whole_scores_row_holds_every_score_at_once_at_the_matmul_kernels_numerics(monkeypatch):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny

    import qc_compiler as qc
    import qc_compiler.specs as specs
    from qc_compiler.passes import AttentionPrecision
    from qc_compiler.specs import low_precision_attention
    from qc_compiler.tools.bench import WholeScoresAttention, whole_scores_attention
    from test_torch_int8 import aten_ops

    monkeypatch.setattr(specs, "WHOLE_SCORES_MAX_MIB", 0)  # the pass's matmul kernel blocks at any size
    model = make_tiny()
    whole = qc.compile(model, [WholeScoresAttention(dtype="bf16")], sampler=qc.DDPM(steps=3))
    blocked = qc.compile(model, [AttentionPrecision(dtype="bf16", kernel="matmul")], sampler=qc.DDPM(steps=3))
    targets = [n.target for n in whole.graph_module.graph.nodes]
    assert targets.count(whole_scores_attention) == 2 and low_precision_attention not in targets
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3, 7]), torch.tensor([1, 2])
    with torch.no_grad():
        ref, a, b = model(x, t, y), whole(x, t, y), blocked(x, t, y)
        assert "blocked_attention" not in aten_ops(whole, x, t, y) and "blocked_attention" in aten_ops(blocked, x, t, y)
    assert float((a - b).norm() / ref.norm()) < 1e-3  # bf16 both, rounded in slightly different places
    assert float((a - ref).norm() / ref.norm()) > 1e-5  # really bf16 (FP32 attention: 0 here)


def test_cache_steps_times_each_lowering_per_step_kind(capsys, tmp_path, monkeypatch):
    import json

    compile_ = torch.compile  # dynamo's capture without Inductor's cold compiles: the script's logic is checked
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager"))
    cache_steps = load("cache_steps")
    result = cache_steps.main(cache_steps.parse_args(["--model", "DiT-T/4", "--batch", "2", "--steps", "4",
                                                      "--threads", "1", "--rounds", "1", "--runs", "1",
                                                      "--json", str(tmp_path / "c.json")]))
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["machine"]["cpu"] and [r["row"] for r in saved["rows"]] == [r["row"] for r in result["rows"]]
    labels = [r["row"] for r in saved["rows"]]
    assert labels == ["torch INT8 + cache", "Inductor + cache, whole graph per pattern",
                      "Inductor + cache, a graph break per region", "Inductor, no cache"]
    assert all(line in out for line in ("| torch INT8 + cache |", "4-step sampling runs"))
    assert saved["rows"][-1]["reuse_step_s"] is None and saved["rows"][-1]["vs_uncached_forward"] == 1.0
    assert len(saved["sampling_runs_s"]) == 2 and all(len(v) == 1 for v in saved["sampling_runs_s"].values())
    with pytest.raises(SystemExit):
        cache_steps.parse_args(["--rounds", "0"])
