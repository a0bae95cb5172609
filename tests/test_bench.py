import pytest

from qc_compiler.quant import LayerQuant
from qc_compiler.quant.balance import BalanceConfig
from qc_compiler.quant.brecq import BRECQConfig

from qc_compiler.passes import Quantize
from qc_compiler.specs import StepCacheConfig
from qc_compiler.tools.bench import VARIANTS, Variant, ablation_rows, markdown, variant_passes


def names(passes):
    return [p.name for p in passes]


def test_variants_map_to_pass_lists_built_from_configs():
    assert variant_passes("fp32") == []
    assert names(variant_passes("cache-i3")) == ["step_cache"] and variant_passes("cache-i3")[0].config.interval == 3
    adaptive = variant_passes("cache-adaptive-0.3")[0].config
    assert adaptive.policy == "adaptive" and adaptive.threshold == 0.3
    assert names(variant_passes("quant-tap")) == ["tap_calibration", "quantize"]
    w4 = variant_passes("w4a8-uniform")
    assert names(w4) == ["uniform_calibration", "quantize"] and w4[1].config.default.weight_bits == 4
    qc = variant_passes("qc-tap-vc", cache=StepCacheConfig(interval=3), vc_placement="sample")
    assert names(qc) == ["step_cache", "tap_calibration", "quantize", "variance_compensation"]
    assert qc[0].config.interval == 3 and qc[-1].placement == "sample" and qc[-1].form == "exact"
    # the run's cache is one config, of any policy: the same spelling as --pass step_cache
    adaptive_run = variant_passes("qc-tap", cache=StepCacheConfig(policy="adaptive", threshold=0.2))
    assert adaptive_run[0].config.policy == "adaptive" and variant_passes("cache", cache=StepCacheConfig(interval=5))[0].config.every == 5
    assert variant_passes("qc-tap-vcvar")[-1].form == "variance"
    assert variant_passes("quant-tap")[-1].config.weight_only is None  # the adapter's conditioning linears
    # the calibration seed reaches the selector (pool runs and draw): error bars over calibrations
    assert variant_passes("quant-tap")[0].seed == 0 and variant_passes("quant-tap", calib_seed=3)[0].seed == 3
    tok = variant_passes("qc-uniform-gptq-bal-lr16-atok-vcvar", bits="w4a4")
    assert tok[2].config.default.per_token and tok[2].low_rank == 16 and tok[-1].form == "variance"
    assert variant_passes("quant-tap-condq")[-1].config.weight_only == ()
    assert variant_passes("qc-tap-condq-vc")[2].config.weight_only == ()
    assert names(variant_passes("qc-kmeans")) == ["step_cache", "kmeans_calibration", "quantize"]
    custom = Variant(cache=StepCacheConfig(interval=4), selector="random", vc="variance")
    assert names(variant_passes(custom)) == ["step_cache", "random_calibration", "quantize", "variance_compensation"]


def test_every_listed_variant_builds_and_unknown_ones_fail():
    for name in VARIANTS:
        if VARIANTS[name].mixed:  # its config comes from a sensitivity ranking (mixed_config)
            with pytest.raises(ValueError, match="mixed_config"):
                variant_passes(name)
            continue
        passes = variant_passes(name)
        quant = [p for p in passes if isinstance(p, Quantize)]
        if quant:  # the low-bit options reach the pass
            assert quant[0].rounding == VARIANTS[name].rounding and quant[0].low_rank == VARIANTS[name].low_rank
            want = VARIANTS[name].balance
            assert quant[0].balance == (BalanceConfig(method=want) if isinstance(want, str) else want)
            assert quant[0].config.default.act_observer == (VARIANTS[name].act_observer or "minmax")
    assert VARIANTS["quant-uniform-gptq-bal-lr16"] == Variant(selector="uniform", rounding="gptq", balance="search",
                                                              low_rank=16)
    assert "qc-tap-vc" in ablation_rows() and "qc-uniform" in ablation_rows()
    assert VARIANTS["cache-i2"].bits_independent and not VARIANTS["qc-tap"].bits_independent
    for bad in ("quant-magic", "quant-tap-vc", "qc-tap-vc-condq", "qc-tap-condq-condq", "qc-tap-fast"):
        with pytest.raises(ValueError, match="unknown variant"):
            variant_passes(bad)
    with pytest.raises(ValueError, match="selector"):
        Variant(vc="exact")
    with pytest.raises(ValueError, match="selector"):
        Variant(act_observer="mse")
    amse = variant_passes("qc-uniform-brecq-bal-lr16-amse-vcvar", bits="w4a4")
    assert names(amse) == ["step_cache", "uniform_calibration", "quantize", "variance_compensation"]
    assert amse[2].config.default == LayerQuant(4, 4, act_observer="mse") and amse[2].rounding == "brecq"
    # BRECQ's options reach the pass (4,000 steps a block), the default variant keeps the defaults
    assert variant_passes("qc-uniform-brecq4k-vcvar", bits="w4a8")[2].brecq.iters == 4000
    assert variant_passes("quant-uniform-brecq", bits="w4a8")[1].brecq.iters == 2000
    with pytest.raises(ValueError, match="selector"):
        Variant(brecq=BRECQConfig(iters=10))
    with pytest.raises(ValueError, match="brecq"):  # options for a rounding not chosen: refused by the pass
        variant_passes(Variant(selector="uniform", rounding="gptq", brecq=BRECQConfig(iters=10)))


def test_markdown_table_has_a_row_per_variant():
    row = dict(variant="fp32", bits="w8a8", steps=50, fid=1.0, sfid=2.0, precision=0.9, recall=0.8, class_acc=0.99,
               sample_s=10.0, speed_vs_fp32=1.0, speed_vs_fp32_250=5.0, **{"is": 9.0})
    table = markdown([row, dict(row, variant="quant-tap", speed_vs_fp32=2.0)], n=10, cfg=1.5)
    assert table.count("\n") == 3 and "| quant-tap | w8a8 | 50 |" in table and "2.00x" in table
    assert "| 1.00 | +0.0% |" in table
    worse = markdown([row, dict(row, variant="quant-tap", fid=1.086)], n=10, cfg=1.5)
    assert "| 1.09 | +8.6% |" in worse
    assert "| qc-tap-vc (interval 3) | w4a8 |" in markdown([dict(row, variant="qc-tap-vc", bits="w4a8", cache="interval 3")], 10, 1.5)
    assert "| qc-tap-vc (interval 3) |" in markdown([dict(row, variant="qc-tap-vc", cache_interval=3)], 10, 1.5)  # old files
    no_fp250 = markdown([dict(row, speed_vs_fp32_250=float("nan"))], 10, 1.5)
    assert no_fp250.rstrip().endswith("| 1.00x | - |") and "nan" not in no_fp250


def test_merge_results_sets_speed_of_a_second_file_against_the_first_fp32(tmp_path):
    import json

    from qc_compiler.tools.bench import merge_results

    nan = float("nan")
    first = {"rows": [dict(variant="fp32", steps=50, sample_s=100.0, speed_vs_fp32=1.0, fp32_250_s=500.0),
                      dict(variant="fp32", steps=100, sample_s=200.0, speed_vs_fp32=1.0)]}
    second = {"rows": [dict(variant="quant-tap", steps=50, sample_s=40.0, speed_vs_fp32=nan, speed_vs_fp32_250=nan)]}
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    rerun = {"rows": [dict(variant="fp32", steps=50, sample_s=90.0, speed_vs_fp32=1.0),  # measured again elsewhere
                      dict(variant="quant-tap", bits="w4a8", steps=50, sample_s=30.0, speed_vs_fp32=3.0)]}
    (tmp_path / "c.json").write_text(json.dumps(rerun))
    rows = merge_results([tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"], steps=50)
    assert [(r["variant"], r.get("bits")) for r in rows] == [("fp32", None), ("quant-tap", None), ("quant-tap", "w4a8")]
    assert rows[0]["sample_s"] == 100.0  # a row two files measured comes from the first
    assert rows[1]["speed_vs_fp32"] == 2.5 and rows[1]["speed_vs_fp32_250"] == 12.5


def test_ablation_runs_fp32_and_cache_rows_once_per_step_count(monkeypatch):
    """A second bit width reuses the FP32 time and does not sample the bit-independent rows again."""
    import qc_compiler.tools.bench as bench
    from qc_compiler.cli import main

    calls = []

    def fake_run_variants(names, *, bits, cache, fp, **kwargs):
        calls.append((list(names), bits, fp.seconds))
        assert kwargs["calib_seed"] == 5
        assert cache == StepCacheConfig(interval=3)
        if "fp32" in names:
            fp.seconds = 7.0
        return [dict(variant=n, bits="-" if bench.VARIANTS[n].bits_independent else bits, steps=50, fid=1.0, sfid=1.0,
                     precision=1.0, recall=1.0, class_acc=1.0, sample_s=7.0, speed_vs_fp32=1.0,
                     speed_vs_fp32_250=float("nan"), fp32_sample_s=fp.seconds, fp32_250_s=None,
                     **{"is": 1.0}) for n in names]

    monkeypatch.setattr(bench, "run_variants", fake_run_variants)
    assert main(["bench", "ablation", "--bits", "w8a8,w4a8", "--steps", "50", "--n", "10", "--cache", "interval=3",
                 "--calib-seed", "5"]) == 0
    (first, bits1, ref1), (second, bits2, ref2) = calls
    assert (bits1, bits2) == ("w8a8", "w4a8") and ref1 is None and ref2 == 7.0
    assert "fp32" in first and "cache" in first and "quant-tap" in first
    assert "fp32" not in second and "cache" not in second and "qc-tap-vc" in second


@pytest.mark.parametrize("cache, needle", [("interval=2.7", "must be an integer"), ("interval=true", "must be an integer"),
                                           ("policy=adaptive,interval=3", "interval is an option of the interval policy"),
                                           ("policy=adaptive,threshold=nan", "must be a number"),
                                           ("policy=adaptive,threshold=NaN", "finite")])
def test_bench_cache_option_is_typed(cache, needle, capsys):
    from qc_compiler.cli import main

    assert main(["bench", "quality", "--cache", cache]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_benchmark_recipe_every_linear_quantizes_the_conditioning_inputs_too():
    """forward_speed.py's like-for-like row against PT2E's all-layers one: 12 INT8 layers, not 9 + 3 weight-only."""
    from conftest import make_tiny

    import qc_compiler as qc
    from qc_compiler.backends.torch_int8 import Int8Linear, WeightOnlyLinear
    from qc_compiler.tools.bench import compile_benchmark_w8a8

    sampler = qc.DDPM(steps=2)
    default = compile_benchmark_w8a8(make_tiny(), sampler)
    every = compile_benchmark_w8a8(make_tiny(), sampler, every_linear=True)
    kinds = lambda m: [type(x).__name__ for x in m.modules() if isinstance(x, (Int8Linear, WeightOnlyLinear))]  # noqa: E731
    assert sorted(kinds(default)).count("WeightOnlyLinear") == 3 and kinds(every) == ["Int8Linear"] * 12


def test_interleaved_times_warms_each_callable_once_unless_told_not_to():
    from qc_compiler.tools.bench import interleaved_times

    calls = []
    times = interleaved_times([lambda: calls.append("a"), lambda: calls.append("b")], 2, pause=0.0)
    assert calls == ["a", "b"] * 3 and [len(t) for t in times] == [2, 2]  # one warm-up round, two timed
    calls.clear()
    interleaved_times([lambda: calls.append("a")], 2, pause=0.0, warmup=False)
    assert calls == ["a", "a"]


def test_pinned_moves_every_thread_and_gives_each_its_cpus_back():
    import os
    import threading

    from qc_compiler.tools.bench import pinned

    allowed = sorted(os.sched_getaffinity(0))
    stop, seen = threading.Event(), {}
    worker = threading.Thread(target=lambda: (seen.setdefault("tid", threading.get_native_id()), stop.wait()))
    worker.start()
    try:
        while "tid" not in seen:
            pass
        with pinned([allowed[-1]]):
            assert os.sched_getaffinity(0) == {allowed[-1]}
            assert os.sched_getaffinity(seen["tid"]) == {allowed[-1]}  # a thread already running moves too
        assert sorted(os.sched_getaffinity(0)) == allowed and sorted(os.sched_getaffinity(seen["tid"])) == allowed
        with pinned([]):  # no CPUs named: nothing moves
            assert sorted(os.sched_getaffinity(0)) == allowed
    finally:
        stop.set()
        worker.join()


def test_benchmark_recipe_reuses_a_calibration_and_adds_bf16_attention_after_it():
    import torch
    from conftest import make_tiny

    import qc_compiler as qc
    from qc_compiler.specs import low_precision_attention
    from qc_compiler.tools.bench import compile_benchmark_w8a8

    sampler, model = qc.DDPM(steps=2), make_tiny()
    first = compile_benchmark_w8a8(model, sampler)
    again = compile_benchmark_w8a8(model, sampler, like=first)  # restored, not recalibrated
    assert [r.name for r in again.records] == [r.name for r in first.records]
    assert all(torch.equal(first.build["fitted"][k], again.build["fitted"][k]) for k in first.build["fitted"]
               if torch.is_tensor(first.build["fitted"][k]))
    bf16 = compile_benchmark_w8a8(model, sampler, attention="bf16")
    assert bf16.records[-1].name == "attention_precision"
    assert any(n.target is low_precision_attention for n in bf16.graph_module.graph.nodes)
