import pytest
import torch
import torch.nn.functional as F

import qc_compiler as qc
from qc_compiler.attention import bf16_attention
from qc_compiler.passes import Bf16Attention, Quantize, StepCache, UniformCalibration
from qc_compiler.passes.cache import CacheLookup
from qc_compiler.regions import iter_graph_modules
from conftest import make_tiny

SAMPLER = qc.DDPM(steps=4)


def attention_targets(cm):
    return [n.target for _, g in iter_graph_modules(cm.graph_module) for n in g.graph.nodes
            if n.target in (F.scaled_dot_product_attention, bf16_attention)]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_bf16_attention_is_close_to_fp32_but_really_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 32) for _ in range(3))
    ref, out = F.scaled_dot_product_attention(q, k, v), bf16_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert 1e-4 < rel(out, ref) < 1e-2  # bf16 has an 8-bit mantissa: not bit-exact, yet close
    torch.testing.assert_close(bf16_attention(q, k, v, scale=0.5), F.scaled_dot_product_attention(q, k, v, scale=0.5),
                               rtol=0.05, atol=0.02)


@pytest.mark.parametrize("order", ["first", "after_cache"])
def test_pass_rewrites_every_attention_including_cached_regions(order):
    model = make_tiny()
    passes = [Bf16Attention(), StepCache(interval=2)] if order == "first" else [StepCache(interval=2), Bf16Attention()]
    cm = qc.compile(model, passes=passes, sampler=SAMPLER)
    plain = qc.compile(model, passes=[StepCache(interval=2)], sampler=SAMPLER)
    assert attention_targets(cm) == [bf16_attention] * 2 and attention_targets(plain) == [F.scaled_dot_product_attention] * 2
    # The FLOP counts behind the cache report still see the attention, whatever the pass order.
    policies = [next(m for m in c.modules() if isinstance(m, CacheLookup)).policy for c in (cm, plain)]
    assert policies[0].region_flops == policies[1].region_flops and policies[0].block_flops == policies[1].block_flops
    a, b = SAMPLER.sample(cm, [1, 2], seed=0), SAMPLER.sample(plain, [1, 2], seed=0)
    assert 0 < rel(a, b) < 1e-2
    assert "bf16_attention" in cm.report()


def test_int8_backend_matches_fake_quant_reference_with_bf16_attention():
    passes = lambda: [Bf16Attention(), UniformCalibration(size=20, pool_labels=4), Quantize(preset="w8a8")]  # noqa: E731
    i8 = qc.compile(make_tiny(), passes=passes(), sampler=SAMPLER)
    fq = qc.compile(make_tiny(), passes=passes(), sampler=SAMPLER, backend="fakequant")
    assert rel(SAMPLER.sample(i8, [1, 2], seed=0), SAMPLER.sample(fq, [1, 2], seed=0)) < 2e-3


def test_saved_model_reloads_with_bf16_attention(tmp_path):
    cm = qc.compile(make_tiny(), passes=[Bf16Attention()], sampler=SAMPLER)
    cm.save(tmp_path / "m")
    loaded = qc.load_compiled(tmp_path / "m")
    assert attention_targets(loaded) == [bf16_attention] * 2
    assert torch.equal(SAMPLER.sample(loaded, [3], seed=0), SAMPLER.sample(cm, [3], seed=0))


def test_onnx_export_writes_fp32_attention(tmp_path):
    from qc_compiler.backends.onnx import OrtDenoiser
    passes = [Bf16Attention(), UniformCalibration(size=20, pool_labels=4), Quantize(preset="w8a8")]
    cm = qc.compile(make_tiny(), passes=passes, sampler=SAMPLER)
    ort = OrtDenoiser(cm.export_onnx(tmp_path / "m.onnx"), threads=1)
    x, t, y = torch.randn(2, 1, 16, 16), torch.full((2,), cm.timesteps[0]), torch.tensor([1, 2])
    assert rel(ort(x, t, y), cm(x, t, y)) < 2e-2


def test_model_without_fused_attention_is_a_clear_error():
    with pytest.raises(qc.PassError, match="fused_attn=False"):
        qc.compile(make_tiny(fused_attn=False), passes=[Bf16Attention()], sampler=SAMPLER)
