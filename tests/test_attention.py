"""The attention-precision pass: every attention call rewritten (cache regions too), the numerics of
bf16 attention and no more, refused where it cannot run or would do nothing."""
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import qc_compiler as qc
from conftest import make_tiny as tiny
from qc_compiler.errors import ExportError, PassError
from qc_compiler.passes import AttentionPrecision, Quantize, StepCache, UniformCalibration
from qc_compiler.specs import low_precision_attention


def inputs(fast, batch=2):
    """x, the first step's timestep (a cached model runs one step per call), labels."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 16, 16, generator=g), torch.full((batch,), fast.timesteps[0]), torch.arange(batch)


def test_bf16_attention_matches_an_independent_formula_on_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    out = low_precision_attention(q, k, v, dtype="bf16")
    assert out.dtype == torch.float32 and torch.equal(out, out.bfloat16().float())  # computed in bf16, cast back
    # softmax(q k^T / sqrt(d)) v in float64 on the bf16-rounded inputs: what bf16 attention computes, but exact
    qd, kd, vd = (t.bfloat16().double() for t in (q, k, v))
    ref = torch.softmax(qd @ kd.transpose(-2, -1) / math.sqrt(8), dim=-1) @ vd
    assert (out.double() - ref).abs().max() < 2 ** -7  # bf16 output rounding, and no more
    fp32 = F.scaled_dot_product_attention(q, k, v)
    assert (out - fp32).abs().max() > 1e-4  # it really ran in bf16 (FP32 agrees with itself to ~1e-7)
    nan = q.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert low_precision_attention(nan, k, v, dtype="bf16")[0, 0, 0].isnan().all()  # NaN in, NaN out


def reference(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v in float64 on the bf16-rounded inputs (a bool mask keeps where True)."""
    qd, kd, vd = (t.bfloat16().double() for t in (q, k, v))
    scores = qd @ kd.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, dim=-1) @ vd


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_both_kernels_compute_attention_with_masks_causality_and_scale(kernel):
    from test_torch_int8 import aten_ops

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    bool_mask = torch.rand(16, 16, generator=g) > 0.3
    bool_mask[:, 0] = True  # no row masked whole
    float_mask = torch.randn(2, 1, 16, 16, generator=g)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    cases = [({}, None, None), ({"attn_mask": bool_mask}, bool_mask, None), ({"attn_mask": float_mask}, float_mask, None),
             ({"is_causal": True}, causal, None), ({"scale": 0.5, "dropout_p": 0.0}, None, 0.5)]
    for kwargs, mask, scale in cases:
        out = low_precision_attention(q, k, v, dtype="bf16", kernel=kernel, **kwargs)
        ref = reference(q, k, v, mask, scale)
        # bf16 rounding of the output (and, as two matmuls, of the scores and the probabilities), and no more
        assert (out.double() - ref).abs().max() < (2 ** -7 if kernel == "sdpa" else 2 ** -5), kwargs
        assert (out - low_precision_attention(q, k, v, dtype="bf16", kernel=kernel)).abs().max() > 1e-3 or not kwargs
    ops = aten_ops(lambda: low_precision_attention(q, k, v, dtype="bf16", kernel=kernel))
    fused = any("scaled_dot_product" in op for op in ops)
    assert fused == (kernel == "sdpa") and (("bmm" in ops) == (kernel == "matmul"))  # the kernel asked for ran
    big = aten_ops(lambda: low_precision_attention(q, k, v, dtype="bf16", kernel=kernel, max_scores_mib=0.001))
    assert any("scaled_dot_product" in op for op in big)  # scores past the bound: the fused kernel, whichever asked
    ops = aten_ops(lambda: low_precision_attention(q, k, v, dropout_p=0.5, dtype="bf16", kernel=kernel))
    assert "bernoulli_" in ops  # dropout is SDPA's to apply (the matmul form has none): handed to it, not lost
    nan = q.clone()
    nan[0, 0, 0, 0] = float("nan")
    out = low_precision_attention(nan, k, v, dtype="bf16", kernel=kernel)
    assert out[0, 0, 0].isnan().all() and not out[0, 0, 1:].isnan().any()  # NaN in, NaN out, in its row


@pytest.mark.parametrize("amx", [True, False])
def test_auto_picks_the_fused_kernel_with_amx_and_the_matmuls_without(amx, monkeypatch):
    import qc_compiler.passes.attention as attention

    monkeypatch.setattr(attention, "cpu_has_amx_bf16", lambda: amx)
    fast = qc.compile(tiny(), passes=[AttentionPrecision()], sampler=qc.DDPM(steps=4))
    kernel = "sdpa" if amx else "matmul"
    assert fast.records[0].notes == {"calls": 2, "dtype": "bf16", "kernel": kernel}
    nodes = [n for n in fast.graph_module.graph.nodes if n.target is low_precision_attention]
    assert [n.kwargs["kernel"] for n in nodes] == [kernel, kernel]
    # auto's matmuls only while their scores stay small; no bound on the fused kernel
    assert [n.kwargs["max_scores_mib"] for n in nodes] == [None if amx else 32] * 2
    for name in ("sdpa", "matmul"):
        chosen = qc.compile(tiny(), passes=[AttentionPrecision(kernel=name)], sampler=qc.DDPM(steps=4))
        assert chosen.records[0].notes["kernel"] == name  # a kernel chosen by name is kept, unbounded
        assert all(n.kwargs["max_scores_mib"] is None for n in chosen.graph_module.graph.nodes
                   if n.target is low_precision_attention)
    with pytest.raises(ValueError, match="kernel"):
        AttentionPrecision(kernel="flash")


def test_every_attention_call_is_rewritten_cache_regions_included():
    model = tiny()
    fast = qc.compile(model, passes=[StepCache(interval=2), AttentionPrecision(dtype="bf16")], sampler=qc.DDPM(steps=4))
    targets = [n.target for m in fast.graph_module.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes]
    assert targets.count(low_precision_attention) == len(model.blocks) == fast.records[-1].notes["calls"]
    assert F.scaled_dot_product_attention not in targets
    x, t, y = inputs(fast)
    with torch.no_grad():
        ref = model(x, t, y)
        fast.reset()
        err = float((fast(x, t, y) - ref).norm() / ref.norm())
    assert 5e-6 < err < 1e-3  # bf16 attention's error (measured 3.3e-5; without the pass, 0): changed, only by that


def test_with_w8a8_through_inductor_and_reloaded(tmp_path):
    model = tiny()
    passes = [UniformCalibration(size=8, pool_labels=2), Quantize(preset="w8a8"), AttentionPrecision()]
    torch_int8 = qc.compile(model, passes=passes, sampler=qc.DDPM(steps=4))
    x, t, y = inputs(torch_int8)
    with torch.no_grad():
        torch_int8.reset()
        out = torch_int8(x, t, y)
        torch_int8.save(tmp_path / "m")
        again = qc.load_compiled(tmp_path / "m")
        again.reset()
        assert torch.equal(again(x, t, y), out)  # the pass is in the manifest and runs again on load
        ind = qc.compile(model, passes=passes, sampler=qc.DDPM(steps=4), backend="inductor",
                         fitted=torch_int8.build["fitted"])
        ind.reset()
        assert float((ind(x, t, y) - out).norm() / out.norm()) < 1e-2  # same codes; bf16 rounding differs a little


def test_refused_where_it_would_do_nothing_or_cannot_run(tmp_path):
    with pytest.raises(PassError, match="no scaled_dot_product_attention"):
        qc.compile(tiny(fused_attn=False), passes=[AttentionPrecision()], sampler=qc.DDPM(steps=4))
    ran = []

    class MustNotRun(UniformCalibration):
        def run(self, gm, ctx):
            ran.append(True)
            return super().run(gm, ctx)

    with pytest.raises(ExportError, match="no onnxruntime CPU kernel"):  # before any pass runs
        qc.compile(tiny(), passes=[MustNotRun(size=8), AttentionPrecision()], sampler=qc.DDPM(steps=4), backend="onnx")
    assert not ran
    fast = qc.compile(tiny(), passes=[AttentionPrecision()], sampler=qc.DDPM(steps=4))
    with pytest.raises(ExportError, match="cannot export attention in bf16"):
        fast.export_onnx(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="dtype"):
        AttentionPrecision(dtype="fp32")
