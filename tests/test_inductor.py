"""The Inductor backend: our calibrated graph through torch.compile, INT8 GEMMs fused by Inductor's x86
patterns, cache decisions outside the compiled code, no recompiles across runs."""
import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from conftest import make_tiny

import qc_compiler as qc
from qc_compiler.backends import inductor
from qc_compiler.backends.inductor import CachePatternModule, InductorModule, QDQLinear
from qc_compiler.backends.registry import cpu_has_vnni
from qc_compiler.passes import Quantize, StepCache, UniformCalibration, VarianceCompensation
from qc_compiler.quant import QuantConfig

LABELS = [1, 2, 3]


def passes(**quant):
    return [StepCache(interval=2), UniformCalibration(size=16, pool_labels=4, num_steps=4), Quantize(**quant)]


@pytest.mark.slow
def test_inductor_lowering_matches_the_reference_fuses_int8_and_never_recompiles():
    model, sampler = make_tiny(), qc.DDPM(steps=4)
    model.blocks = model.blocks[:1]  # one block: every kind of region and layer, half the cold compile
    dynamo_utils.counters.clear()
    bits = "w8a8" if cpu_has_vnni() else "w4a8"  # without VNNI, W8A8 is refused (its GEMM would saturate)
    vc = lambda: [VarianceCompensation(batch=4)]  # noqa: E731  (sample placement: a sampler hook, kept eager)
    fast = qc.compile(model, passes(preset=bits) + vc(), sampler=sampler, backend="inductor")
    reference = qc.compile(model, passes(preset=bits) + vc(), sampler=sampler, backend="fakequant")
    assert len(fast.step_hooks) == 1 and len(reference.step_hooks) == 1  # VC was once dropped here, silently
    assert sum(isinstance(m, QDQLinear) for m in fast.modules()) == 7  # 5 INT8 GEMMs + 2 weight-only
    # the weight-only ones on the INT8 GEMM that reads their codes, where the CPU accumulates in int32
    assert sum(m.int8_gemm for m in fast.modules() if isinstance(m, QDQLinear)) == 2 * cpu_has_vnni()
    assert isinstance(fast.graph_module, CachePatternModule)  # interval cache: one graph per pattern
    first = sampler.sample(fast, LABELS, seed=0)
    frames = dict(dynamo_utils.counters["frames"])
    assert frames["total"] == frames["ok"] == 2  # compute-step and reuse-step graphs, no graph breaks
    # Inductor matched our quantize/dequantize form and lowered every W8A8 linear to a oneDNN INT8 GEMM:
    # the 5 of the compute-step graph, and the final layer again in the reuse-step graph
    assert dynamo_utils.counters["inductor"]["qlinear_weight_prepack_matcher_count"] == 6
    again = sampler.sample(fast, LABELS, seed=0)
    assert dict(dynamo_utils.counters["frames"]) == frames  # a second run (and every cached step) compiled nothing
    assert torch.equal(first, again)
    want = sampler.sample(reference, LABELS, seed=0)
    assert float((first - want).norm() / want.norm()) < 1e-3  # the fake-quant reference, up to rounding ties
    assert "first call (compile)" in fast.report() and "C" in fast.report()  # compile time; the cache ran


def eager_dynamo(monkeypatch):
    """dynamo's capture and guards, without Inductor's CPU codegen (a cold compile a graph)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager"))


def test_cache_pattern_graphs_equal_the_per_region_lowering_and_keep_the_cache_state(monkeypatch):
    eager_dynamo(monkeypatch)
    model, sampler = make_tiny(), qc.DDPM(steps=5)
    quant = lambda: passes(preset="w8a8")  # noqa: E731
    fast = qc.compile(model, quant(), sampler=sampler, backend="inductor")
    with monkeypatch.context() as m:  # the graph-break lowering, as for a data-dependent policy
        m.setattr(inductor, "_whole_graph_plan", lambda gm, step_aware: None)
        broken = qc.compile(model, quant(), sampler=sampler, backend="inductor", fitted=fast.build["fitted"])
    assert isinstance(fast.graph_module, CachePatternModule) and type(broken.graph_module) is InductorModule
    dynamo_utils.counters.clear()
    first = sampler.sample(fast, LABELS, seed=0)
    frames = dict(dynamo_utils.counters["frames"])
    assert frames["total"] == frames["ok"] == 2  # five steps, two graphs (compute, reuse), no breaks
    assert torch.equal(sampler.sample(fast, LABELS, seed=1), sampler.sample(broken, LABELS, seed=1))
    assert dict(dynamo_utils.counters["frames"])["total"] > frames["total"]  # the broken one: a graph per piece
    assert fast.step_state.store("cache")["computed"] == broken.step_state.store("cache")["computed"] == {
        0: {0, 1, 2, 3}, 2: {0, 1, 2, 3}, 4: {0, 1, 2, 3}}
    assert sorted(fast.graph_module.patterns) == [("whole", (False,) * 4, False), ("whole", (True,) * 4, False)]
    assert "no graph break per region" in fast.report() and "step   1: ...." in fast.report()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor(sampler.timesteps[:1] * 3), torch.tensor(LABELS)
    plain = fast(x, t, y)  # step 0 starts a run: every region computes and is kept
    fast.step_state.enter(1)  # past the compiled model's own batch check: the graph's
    with pytest.raises(qc.StepError, match="batch size changed"):
        fast.graph_module(x[:2], torch.tensor(sampler.timesteps[1:2] * 2), y[:2])
    assert torch.equal(plain, broken(x, t, y))


@pytest.mark.parametrize("cache", [False, True])
def test_vc_rescales_take_their_step_row_as_an_input_one_graph_for_every_step(cache, monkeypatch):
    eager_dynamo(monkeypatch)
    model, sampler = make_tiny(), qc.DDPM(steps=4)
    vc = VarianceCompensation(placement="eps", batch=4)
    chain = lambda: [*passes(preset="w8a8")[1 - cache:], vc]  # noqa: E731  (with or without the cache)
    fast = qc.compile(model, chain(), sampler=sampler, backend="inductor")
    with monkeypatch.context() as m:
        m.setattr(inductor, "_whole_graph_plan", lambda gm, step_aware: None)
        broken = qc.compile(model, chain(), sampler=sampler, backend="inductor", fitted=fast.build["fitted"])
    assert isinstance(fast.graph_module, CachePatternModule) and len(fast.graph_module.vcs) == 1
    k = fast.graph_module.vcs[0].k
    assert float((k[1:] - 1).abs().max()) > 1e-4  # K is not the identity: the equality below tests it
    dynamo_utils.counters.clear()
    first = sampler.sample(fast, LABELS, seed=0)
    frames = dict(dynamo_utils.counters["frames"])
    assert frames["total"] == frames["ok"] == 1 + cache  # four steps, four K rows: one graph (per pattern)
    assert torch.equal(first, sampler.sample(broken, LABELS, seed=0))
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor(sampler.timesteps[1:2] * 3), torch.tensor(LABELS)
    fast.step_state.reset(), broken.step_state.reset()
    assert torch.equal(fast.graph_module(x, t, y), broken.graph_module(x, t, y))  # outside a run: no VC


def test_cache_patterns_per_policy_and_what_keeps_the_per_region_lowering():
    from qc_compiler.passes.cache import CacheLookup
    from qc_compiler.specs import CacheSchedule

    def lookups(**schedule):
        cs = CacheSchedule(regions=("a", "b"), **schedule)
        return [CacheLookup(torch.fx.GraphModule({}, torch.fx.Graph()), k, i, cs) for i, k in enumerate("ab")]

    assert inductor._cache_patterns(lookups(policy="interval", interval=3)) == [(True, True), (False, False)]
    assert inductor._cache_patterns(lookups(policy="interval", interval=1)) == [(True, True)]
    assert inductor._cache_patterns(lookups(policy="static", table=[[1, 1], [0, 1], [0, 1], [1, 0]])) == [
        (True, True), (False, True), (True, False)]
    # decided by the data after the probe (region 0, or the first block's regions): two patterns
    assert inductor._cache_patterns(lookups(policy="adaptive")) == [(True, True), (True, False)]
    assert inductor._cache_patterns(lookups(policy="first_block", first_block=2)) == [(True, True)] * 2
    rows = [[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]]  # 4 patterns: still one graph each
    assert len(inductor._cache_patterns(lookups(policy="static", table=rows))) == inductor.MAX_CACHE_PATTERNS
    four = lookups(policy="static", table=rows)
    assert inductor._cache_patterns([*four, CacheLookup(four[0].region, "c", 2, CacheSchedule(
        regions=("a", "b", "c"), policy="static", table=[[1, 1, 1], [0, 1, 0]]))]) is None  # mixed schedules
    table = [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]  # five patterns
    fast = qc.compile(make_tiny(), [StepCache(policy="static", schedule=table)], sampler=qc.DDPM(steps=5),
                      backend="inductor")  # compiles on its first call only
    assert type(fast.graph_module) is InductorModule  # a graph break per region instead


@pytest.mark.parametrize("policy", ["adaptive", "first_block"])
def test_a_data_dependent_cache_cuts_the_graph_after_its_probe(policy, monkeypatch):
    eager_dynamo(monkeypatch)
    model, sampler = make_tiny(), qc.DDPM(steps=6)
    cache = StepCache(policy=policy, threshold=0.05)
    fast = qc.compile(model, [cache], sampler=sampler, backend="inductor")
    with monkeypatch.context() as m:
        m.setattr(inductor, "_whole_graph_plan", lambda gm, step_aware: None)
        broken = qc.compile(model, [cache], sampler=sampler, backend="inductor")
    assert isinstance(fast.graph_module, CachePatternModule) and fast.graph_module.probe
    dynamo_utils.counters.clear()
    first = sampler.sample(fast, LABELS, seed=0)
    frames = dict(dynamo_utils.counters["frames"])
    assert torch.equal(first, sampler.sample(broken, LABELS, seed=0))
    computed = fast.step_state.store("cache")["computed"]
    assert computed == broken.step_state.store("cache")["computed"]
    assert any(len(c) < 4 for c in computed.values()) and any(len(c) == 4 for c in computed.values())  # both ran
    assert frames["total"] == frames["ok"] == 3  # the probe piece, and the rest once per pattern
    assert "cut after the probe region" in fast.report()


def test_inductor_refuses_what_its_int8_patterns_cannot_take(tmp_path, monkeypatch):
    with pytest.raises(qc.ExportError, match="per-step-group"):
        qc.compile(make_tiny(), passes(config=QuantConfig(act_step_groups=2)), sampler=qc.DDPM(steps=4),
                   backend="inductor")
    with pytest.raises(qc.ExportError, match="4-bit activations"):
        qc.compile(make_tiny(), passes(preset="w4a4"), sampler=qc.DDPM(steps=4), backend="inductor")
    monkeypatch.setenv("QC_CPU_VNNI", "0")
    with pytest.raises(qc.ExportError, match="saturates W8A8 on this CPU"):
        qc.compile(make_tiny(), passes(preset="w8a8"), sampler=qc.DDPM(steps=4), backend="inductor")
    plain = qc.compile(make_tiny(), [], sampler=qc.DDPM(steps=4), backend="inductor")  # compiles on first call only
    with pytest.raises(qc.ExportError, match="backend='torch'"):
        plain.export_onnx(tmp_path / "m.onnx")


def test_int_mm_route_compiles_the_torch_int8_layers_in_and_never_recompiles(monkeypatch):
    """The CUDA route (forced here on the CPU): the torch backend's _int_mm layers inside the compiled
    graph, equal to that backend, and a constant-range layer never makes a step-dependent guard."""
    from qc_compiler.backends import inductor
    from qc_compiler.backends.torch_int8 import Int8Linear

    monkeypatch.setattr(inductor, "_int_mm_route", lambda gm: True)
    monkeypatch.setenv("QC_INT8_KERNEL", "int_mm")
    # dynamo's capture and guards are what this checks; Inductor's CPU codegen would only add a cold
    # compile (the CUDA test and gpu_check.sh run the real one)
    eager_dynamo(monkeypatch)
    model, sampler = make_tiny(), qc.DDPM(steps=3)
    quant = lambda: [UniformCalibration(size=12, pool_labels=4), Quantize(preset="w8a8")]  # noqa: E731
    fast = qc.compile(model, quant(), sampler=sampler, backend="inductor")
    eager = qc.compile(model, quant(), sampler=sampler, backend="torch")
    layers = [m for m in fast.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 9 and all(not m.uses_step and "_torchdynamo" not in repr(m.forward) for m in layers)
    dynamo_utils.counters.clear()
    first = sampler.sample(fast, LABELS, seed=0)
    frames = dict(dynamo_utils.counters["frames"])
    # one graph, compiled once for three steps (measured: 2 frames; a layer that read the step state
    # would guard on it and break the graph: 29 frames)
    assert 1 <= frames.get("ok", 0) == frames["total"] <= 2
    again = sampler.sample(fast, LABELS, seed=1)
    assert dict(dynamo_utils.counters["frames"]) == frames  # three steps, two runs: one compile
    want = sampler.sample(eager, LABELS, seed=0)
    assert float((first - want).norm() / want.norm()) < 1e-4
    assert not torch.equal(first, again) and "torch._int_mm layers" in fast.report()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inductor_runs_int_mm_layers_compiled_with_the_cache_and_never_recompiles():
    from qc_compiler.backends.torch_int8 import Int8Linear

    model, sampler = make_tiny().cuda(), qc.DDPM(steps=4)
    fast = qc.compile(model, passes(preset="w8a8"), sampler=sampler, backend="inductor")
    eager = qc.compile(model, passes(preset="w8a8"), sampler=sampler, backend="torch")
    assert sum(isinstance(m, Int8Linear) and m.kernel == "int_mm" for m in fast.modules()) == 9
    dynamo_utils.counters.clear()
    first = sampler.sample(fast, LABELS, seed=0)
    frames = dict(dynamo_utils.counters["frames"])
    again = sampler.sample(fast, LABELS, seed=0)
    assert dict(dynamo_utils.counters["frames"]) == frames and torch.equal(first, again)
    want = sampler.sample(eager, LABELS, seed=0)
    assert first.is_cuda and float((first - want).norm() / want.norm()) < 1e-3


def test_each_lowered_layer_is_within_one_quantization_step_of_its_fake_quant_layer():
    """Layer by layer: an input code may round the other way (``quantize_per_tensor`` multiplies by 1/s, the
    reference divides), so each output may move by one activation step times its weights' magnitudes, no
    more; a weight-only layer is the reference's float GEMM to rounding."""
    from qc_compiler.quant import QuantLinear

    model, sampler = make_tiny(), qc.DDPM(steps=4)
    bits = "w8a8" if cpu_has_vnni() else "w4a8"
    quant = [UniformCalibration(size=16, pool_labels=4, num_steps=4), Quantize(preset=bits)]
    reference = qc.compile(model, quant, sampler=sampler, backend="fakequant")
    lowered = qc.compile(model, quant, sampler=sampler, backend="inductor", fitted=reference.build["fitted"])
    ref_layers = {m.path: m for m in reference.graph_module.modules() if isinstance(m, QuantLinear)}
    layers = {m.path: m for m in lowered.modules() if isinstance(m, QDQLinear)}
    assert layers.keys() == ref_layers.keys() and len(layers) == 12
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, layer in layers.items():
            ref_layer = ref_layers[path]
            x = torch.randn(7, ref_layer.weight.shape[1], generator=g) * 2
            out, ref = layer(x), ref_layer(x)
            if layer.act_qparams is None:  # weight-only
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
                continue
            w = (layer.w_int8.float() * layer.w_scale[:, None]).abs().sum(1)
            step = layer.act_qparams[0] * w  # one input code flipped in every column, at worst
            assert ((out - ref).abs() <= step + 1e-5 * ref.abs() + 1e-6).all(), path
            assert (out - ref).abs().max() < 0.05 * ref.abs().max(), path  # and far less in practice


def test_fifty_steps_with_the_cache_compile_two_graphs_and_a_second_run_none(monkeypatch):
    eager_dynamo(monkeypatch)  # dynamo's capture, guards and recompiles, without Inductor's codegen
    model, sampler = make_tiny(), qc.DDPM(steps=50)
    quant = [StepCache(interval=2), UniformCalibration(size=16, pool_labels=4, num_steps=4), Quantize(preset="w8a8")]
    fast = qc.compile(model, quant, sampler=sampler, backend="inductor")
    dynamo_utils.counters.clear()
    first = sampler.sample(fast, LABELS, seed=0)
    frames = dict(dynamo_utils.counters["frames"])
    assert frames["total"] == frames["ok"] == 2  # compute-step and reuse-step graphs over all 50 steps
    assert torch.equal(sampler.sample(fast, LABELS, seed=0), first)
    assert dict(dynamo_utils.counters["frames"]) == frames  # the second run compiled nothing
    assert sorted(fast.step_state.store("cache")["computed"]) == list(range(0, 50, 2))
