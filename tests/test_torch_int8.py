import pytest
import torch

import qc_compiler as qc
from qc_compiler.backends.registry import cpu_has_vnni
from qc_compiler.backends.torch_int8 import KERNELS, Int8Linear, WeightOnlyLinear, default_kernel
from qc_compiler.passes import Quantize, StepCache, UniformCalibration, VarianceCompensation
from qc_compiler.quant import QuantConfig, QuantLinear
from conftest import make_tiny

PASSES = lambda bits="w8a8", groups=1: [UniformCalibration(size=24, pool_labels=4),  # noqa: E731
                                        Quantize(config=QuantConfig.preset(bits, act_step_groups=groups))]


def FUSABLE_BITS():  # noqa: N802
    """W8A8 where the fused kernels are exact; without VNNI, W8A8 layers split (and do not fuse), so the
    fusion tests run W4A8 there, whose codes cannot saturate."""
    return "w8a8" if cpu_has_vnni() else "w4a8"


def pairs(fq, i8, lowered_type=Int8Linear):
    """(fake-quant, lowered) layer pairs: the 9 token linears are INT8, the 3 adaLN ones weight-only."""
    a = {m.path: m for m in fq.graph_module.modules() if isinstance(m, QuantLinear)}
    b = {m.path: m for m in i8.graph_module.modules() if isinstance(m, (Int8Linear, WeightOnlyLinear))}
    assert a.keys() == b.keys() and len(a) == 12
    assert sum(isinstance(m, WeightOnlyLinear) for m in b.values()) == 3
    assert all(isinstance(b[k], WeightOnlyLinear) == ("adaLN" in k) for k in b)
    return [(a[k], b[k]) for k in a if isinstance(b[k], lowered_type)]


def aten_ops(fn, *args):
    """The ATen ops ``fn(*args)`` dispatches, by name (``"_int_mm"``, ``"addmm"``, ...)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn(*args)
    return seen


@pytest.mark.parametrize("vnni", [True, False])
def test_conditioning_linears_lower_to_weight_only_int8_matching_the_reference(vnni, monkeypatch):
    if vnni and not cpu_has_vnni():
        pytest.skip("the INT8 GEMM on the codes needs int32 accumulation (VNNI/AMX)")
    monkeypatch.setenv("QC_CPU_VNNI", "1" if vnni else "0")
    model, sampler = make_tiny(), qc.DDPM(steps=3)
    fq = qc.compile(model, passes=PASSES(), sampler=sampler, backend="fakequant")
    i8 = qc.compile(model, passes=PASSES(), sampler=sampler, backend="torch")
    for q, lowered in pairs(fq, i8, WeightOnlyLinear):
        assert q.weight_only and lowered.w_int8.dtype == torch.int8 and lowered.w_int8.abs().max() <= 127
        c = torch.randn(5, q.weight.shape[1]) * 3
        c[1] = 0.0  # a zero row: zero codes, not a 0/0
        ref, out = q(c), lowered(c)
        ops = aten_ops(lowered, c)
        if vnni:  # one INT8 GEMM on the codes, no float GEMM, and the float GEMM's result to float rounding
            assert ops.count("_int_mm") == 1 and not {"mm", "addmm", "linear"} & set(ops)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        else:  # no int32 accumulation: the float GEMM on the dequantized codes, exactly the reference's
            assert "_int_mm" not in ops
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert not torch.equal(out, torch.nn.functional.linear(c, q.weight, q.bias))  # weights are int8
        nan = c.clone()
        nan[3, 0] = float("nan")
        assert lowered(nan).isnan().any(1).tolist() == [False, False, False, True, False]  # that row, only
    gemm = "INT8 GEMM on the codes" if vnni else "float GEMM"
    assert f"weight-only: W8 codes in int8, float input ({gemm})" in i8.report() and "INT8 (" in i8.report()


def test_the_split_rows_reproduce_the_input_to_float32_precision():
    from qc_compiler.quant.weight_only import LEVELS, RESIDUAL_STEPS, split_int8_rows

    x = torch.randn(6, 40) * torch.logspace(-3, 3, 6)[:, None]  # rows of very different ranges
    codes, scale = split_int8_rows(x)
    assert codes.dtype == torch.int8 and codes.shape == (6 * LEVELS, 40) and codes.abs().max() <= 127
    levels = codes.double().reshape(LEVELS, 6, 40)
    back = scale.double() * sum(levels[i] / RESIDUAL_STEPS ** i for i in range(LEVELS))
    err = (back - x.double()).abs() / x.abs().amax(1, keepdim=True).double()
    assert err.max() <= 2 ** -23  # float32's own precision of the row's largest value
    coarse = scale.double() * sum(levels[i] / RESIDUAL_STEPS ** i for i in range(LEVELS - 1))
    assert ((coarse - x.double()).abs() / x.abs().amax(1, keepdim=True).double()).max() > 2 ** -20  # each level counts


def test_all_w8a8_is_one_option_away():
    from qc_compiler.models.adapters.dit import DIT

    full = QuantConfig.preset("w8a8", weight_only=())
    assert full.resolve(DIT).for_op("blocks.0.adaLN_modulation.1", "linear").act_bits == 8
    assert QuantConfig.preset("w8a8").resolve(DIT).for_op("blocks.0.adaLN_modulation.1", "linear").act_bits is None
    cm = qc.compile(make_tiny(), passes=[UniformCalibration(size=24, pool_labels=4), Quantize(config=full)],
                    sampler=qc.DDPM(steps=3), backend="torch")
    assert sum(isinstance(m, Int8Linear) for m in cm.graph_module.modules()) == 12


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4"])
def test_each_int8_layer_matches_its_fake_quant_layer(kernel, bits, monkeypatch):
    monkeypatch.setenv("QC_INT8_KERNEL", kernel)
    model, sampler = make_tiny(), qc.DDPM(steps=3)
    fq = qc.compile(model, passes=PASSES(bits), sampler=sampler, backend="fakequant")
    i8 = qc.compile(model, passes=PASSES(bits), sampler=sampler, backend="torch")
    torch.manual_seed(0)
    for q, lowered in pairs(fq, i8):
        assert lowered.kernel == kernel and lowered.w_int8.dtype == torch.int8
        x = torch.randn(3, 16, q.weight.shape[1]) * 2
        ref, out = q(x), lowered(x)
        if lowered.post_op == "gelu_tanh":
            ref = torch.nn.functional.gelu(ref, approximate="tanh")
        consumer = lowered.requant_consumer
        if consumer is not None:  # fc1 writes fc2's uint8 codes: they are the reference's codes
            scale, zero = consumer.act_qparams()
            codes = ref.div(scale).round().add(zero).clamp(0, 255)
            assert out.dtype == torch.uint8 and (out.float() - codes).abs().max() <= 1
            assert float((out.float() != codes).float().mean()) < 1e-3
            out = (out.float() - zero) * scale
            ref = (codes - zero) * scale
        # Within one quantization step of the output: one activation code times the weights' row sum.
        step = float(q.a_scale[-1]) * float(q.weight.detach().abs().sum(dim=1).max())
        assert (out - ref).abs().max() <= step
        assert float((out - ref).norm() / ref.norm()) < 1e-3  # and almost everywhere far closer


def test_int8_samples_match_fake_quant_with_cache_and_vc():
    model, sampler = make_tiny(), qc.DDPM(steps=5, cfg_scale=1.5)
    bits = FUSABLE_BITS()
    passes = lambda: [StepCache(interval=2)] + PASSES(bits) + [VarianceCompensation(batch=4)]  # noqa: E731
    fq = qc.compile(model, passes=passes(), sampler=sampler, backend="fakequant")
    i8 = qc.compile(model, passes=passes(), sampler=sampler, backend="torch")
    a, b = sampler.sample(fq, [1, 2, 3], seed=0), sampler.sample(i8, [1, 2, 3], seed=0)
    assert float((a - b).norm() / a.norm()) < 1e-3
    assert "INT8" in i8.report() and "+ GELU" in i8.report()  # fc1 -> GELU fused


def test_fc1_writes_fc2_codes_on_onednn(monkeypatch):
    """fc1 (GELU folded) hands uint8 codes in fc2's scale straight to fc2: no float tensor and no separate
    quantization pass between them, and the samples still match the fake-quant reference."""
    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pytest.skip("this PyTorch build has no oneDNN INT8 linear")
    monkeypatch.setenv("QC_INT8_KERNEL", "onednn")
    model, sampler = make_tiny(), qc.DDPM(steps=3)
    i8 = qc.compile(model, passes=PASSES(FUSABLE_BITS()), sampler=sampler, backend="torch")
    fq = qc.compile(model, passes=PASSES(FUSABLE_BITS()), sampler=sampler, backend="fakequant")
    layers = {m.path: m for m in i8.graph_module.modules() if isinstance(m, Int8Linear)}
    fused = {p: m.requant_consumer.path for p, m in layers.items() if m.requant_consumer is not None}
    assert fused and all(p.endswith("mlp.fc1") and c == p[:-1] + "2" for p, c in fused.items())
    seen = []
    fc2 = next(m for p, m in layers.items() if p.endswith("mlp.fc2"))
    fc2.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    a, b = sampler.sample(fq, [1, 2], seed=0), sampler.sample(i8, [1, 2], seed=0)
    assert seen and set(seen) == {torch.uint8}
    assert float((a - b).norm() / a.norm()) < 1e-3
    assert "-> u8 for" in i8.report()


@pytest.mark.parametrize("vnni", ["0", None])
def test_full_range_codes_are_exact_without_vnni(vnni, monkeypatch):
    """oneDNN's u8 x s8 GEMM saturates int16 pair sums on CPUs without VNNI (measured 9.5% error on AMD
    Zen 3); 8-bit layers with weight codes above 64 split their activation codes there. Checked with the
    split forced, and with this machine's own detection (without VNNI, the unsplit kernel fails this)."""
    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pytest.skip("this PyTorch build has no oneDNN INT8 linear")
    monkeypatch.setenv("QC_INT8_KERNEL", "onednn")
    if vnni is not None:
        monkeypatch.setenv("QC_CPU_VNNI", vnni)
    i8 = qc.compile(make_tiny(), passes=PASSES(), sampler=qc.DDPM(steps=3), backend="torch")
    layer = next(m for m in i8.graph_module.modules() if isinstance(m, Int8Linear) and m.path.endswith("mlp.fc2"))
    assert int(layer.w_int8.abs().max()) > 64
    if vnni == "0":
        assert layer.split and layer.post_op == "none" and "split for no VNNI" in i8.report()
        assert all(m.requant_consumer is None for m in i8.graph_module.modules() if isinstance(m, Int8Linear))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (64, layer.w_int8.shape[1]), generator=g, dtype=torch.uint8)
    layer.w_int8.copy_(torch.randint(-127, 128, layer.w_int8.shape, generator=g, dtype=torch.int8))  # full range
    layer.packed = None
    scale, zero = layer.act_qparams()
    exact = ((codes.double() - zero) * scale) @ (layer.w_int8.double() * layer.w_scale.double()[:, None]).T
    exact = exact + layer.bias.double()
    out = layer(codes)
    assert float((out.double() - exact).norm() / exact.norm()) < 1e-6


def test_per_step_groups_pick_the_right_scale():
    sampler = qc.DDPM(steps=4)
    i8 = qc.compile(make_tiny(), passes=PASSES(groups=2), sampler=sampler, backend="torch")
    fq = qc.compile(make_tiny(), passes=PASSES(groups=2), sampler=sampler, backend="fakequant")
    assert torch.allclose(sampler.sample(i8, [5], seed=1), sampler.sample(fq, [5], seed=1), atol=1e-4)
    layer = next(m for m in i8.graph_module.modules() if isinstance(m, Int8Linear))
    a_scale = layer.export_spec().act.a_scale  # per group, then all steps
    assert a_scale.shape == (3,) and a_scale[0] != a_scale[1]


def test_default_kernel_and_override(monkeypatch):
    monkeypatch.delenv("QC_INT8_KERNEL", raising=False)
    assert default_kernel(torch.device("cuda")) == "int_mm"
    assert default_kernel(torch.device("cpu")) in KERNELS
    monkeypatch.setenv("QC_INT8_KERNEL", "nope")
    with pytest.raises(ValueError, match="QC_INT8_KERNEL"):
        default_kernel(torch.device("cpu"))
    def never(*args, **kwargs):
        raise AssertionError("a pass ran before the kernel was checked")
    monkeypatch.setattr(UniformCalibration, "run", never)
    with pytest.raises(qc.ExportError, match="QC_INT8_KERNEL must be one of"):  # refused before any pass runs
        qc.compile(make_tiny(), passes=PASSES(), sampler=qc.DDPM(steps=2), backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_int_mm_matches_fake_quant():
    model, sampler = make_tiny(), qc.DDPM(steps=3)
    fq = qc.compile(model, passes=PASSES(), sampler=sampler, backend="fakequant")
    i8 = qc.compile(model.cuda(), passes=PASSES(), sampler=sampler, backend="torch")
    for q, lowered in pairs(fq, i8):
        x = torch.randn(64, q.weight.shape[1])
        ref = q(x)
        if lowered.post_op == "gelu_tanh":  # fc1's GELU is folded into the lowered layer
            ref = torch.nn.functional.gelu(ref, approximate="tanh")
        torch.testing.assert_close(lowered(x.cuda()).cpu(), ref, rtol=1e-3, atol=1e-3)


def _e4m3_reference(x, layer):
    """FP8 by an independent route: per-row amax/448 scales, e4m3 rounding of both operands, a float GEMM."""
    w = layer.spec.codes.float() * layer.spec.w_scale[:, None]
    ws = w.abs().amax(1, keepdim=True) / 448
    xs = x.abs().amax(1, keepdim=True) / 448
    wq = (w / ws).to(torch.float8_e4m3fn).float() * ws
    xq = (x / xs).to(torch.float8_e4m3fn).float() * xs
    return xq @ wq.t() + layer.bias


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_fp8_lowering_is_e4m3_with_per_row_scales_and_propagates_nan(monkeypatch, device):
    from qc_compiler.backends.torch_int8 import Fp8Linear, fp8_rowwise_supported

    monkeypatch.setenv("QC_INT8_KERNEL", "fp8")
    if not fp8_rowwise_supported(torch.device(device)):  # torch before 2.13 on the CPU: a clear refusal
        with pytest.raises(qc.ExportError, match="per-row"):
            qc.compile(make_tiny().to(device), passes=PASSES(), sampler=qc.DDPM(steps=3), backend="torch")
        pytest.skip(f"this torch's {device} _scaled_mm takes per-tensor scales only")

    monkeypatch.setenv("QC_INT8_KERNEL", "fp8")
    model, sampler = make_tiny(), qc.DDPM(steps=3)
    f8 = qc.compile(model.to(device), passes=PASSES(), sampler=sampler, backend="torch")
    layers = [m for m in f8.graph_module.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 9 and "FP8 e4m3" in f8.report()  # every token linear; adaLN stays weight-only
    torch.manual_seed(0)
    for layer in layers:
        k = layer.w_fp8.shape[1]
        x = torch.randn(21, k, device=device) * torch.logspace(-4, 1, 21, device=device)[:, None]  # rows 1e-4..10
        got, want = layer(x), _e4m3_reference(x, layer)
        # equal up to the bf16 output rounding, row by row; one scale for all rows would flush the small rows' codes
        per_row = (got - want).abs().amax(1) / want.abs().amax(1)
        assert float(per_row.max()) < 1e-2, per_row
        exact = torch.nn.functional.linear(x, layer.spec.codes.float() * layer.spec.w_scale[:, None], layer.bias)
        row = ((got - exact).norm(dim=1) / exact.norm(dim=1))
        assert 1e-3 < float(row.max()) < 0.1  # e4m3 rounding, in every row, small rows too
        x[3, 0] = float("nan")
        out = layer(x)
        assert out[3].isnan().all() and out[torch.arange(21, device=device) != 3].isfinite().all()
