import pytest
import torch

import qc_compiler as qc
from qc_compiler.calibration.pool import CalibrationPool, collect_pool
from qc_compiler.passes import Quantize, StepCache
from qc_compiler.pipeline import graph_pass, register_pass, Pass, PassResult
from qc_compiler.quant import (LayerQuant, QuantConfig, QuantLinear, dequantize, fake_quantize, make_observer,
                               qparams_from_range, quantize)
from qc_compiler.quant.fake_quant import ActQuant
from conftest import make_tiny


# --- quantizer math, by hand ------------------------------------------------------------------
def test_asymmetric_8bit_by_hand():
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), bits=8, symmetric=False)
    assert float(qp.scale) == pytest.approx(4.0 / 255)
    assert int(qp.zero_point) == 64  # round(1 / (4/255)) = round(63.75)
    q = quantize(torch.tensor([-1.0, 0.0, 3.0, 10.0, -5.0]), qp)
    assert q.tolist() == [0, 64, 255, 255, 0]  # 10 and -5 are clamped
    assert float(dequantize(torch.tensor([64]), qp)) == 0.0  # zero is exact


def test_range_is_widened_to_include_zero():
    qp = qparams_from_range(torch.tensor(2.0), torch.tensor(4.0), bits=8, symmetric=False)
    assert int(qp.zero_point) == 0 and float(qp.scale) == pytest.approx(4.0 / 255)


def test_symmetric_4bit_narrow_range():
    qp = qparams_from_range(torch.tensor(-0.5), torch.tensor(0.7), bits=4, symmetric=True)
    assert float(qp.scale) == pytest.approx(0.1) and int(qp.zero_point) == 0  # 0.7 / 7
    assert quantize(torch.tensor([0.7, -0.7, 0.25, 0.35, 2.0]), qp).tolist() == [7, -7, 2, 4, 7]  # 2.5->2, 3.5->4 (half to even)


def test_per_channel_weights():
    w = torch.tensor([[1.0, -2.0], [0.1, 0.05]])
    qp = qparams_from_range(w.min(dim=1).values, w.max(dim=1).values, bits=8, symmetric=True, axis=0)
    assert torch.allclose(qp.scale, torch.tensor([2.0 / 127, 0.1 / 127]))
    assert quantize(w, qp).tolist() == [[64, -127], [127, 64]]  # 63.5 -> 64, row 2: 63.5 -> 64
    assert torch.allclose(fake_quantize(w, qp), w, atol=float(qp.scale.max()) / 2)


@pytest.mark.parametrize("bits", [1, 9, 16, 2.5])
def test_bit_widths_outside_2_to_8_are_rejected(bits):
    with pytest.raises(ValueError, match="2..8"):
        qparams_from_range(torch.tensor(0.0), torch.tensor(1.0), bits=bits, symmetric=False)
    with pytest.raises(ValueError, match="2..8"):
        LayerQuant(weight_bits=bits)


# --- observers --------------------------------------------------------------------------------
def test_minmax_observer_tracks_the_range_over_calls():
    obs = make_observer("minmax", bits=8, symmetric=False)
    obs.update(torch.tensor([-1.0, 0.5]))
    obs.update(torch.tensor([2.0]))
    assert float(obs.compute().scale) == pytest.approx(3.0 / 255)


def test_percentile_observer_ignores_outliers():
    x = torch.cat([torch.linspace(-1, 1, 100000), torch.tensor([100.0])])
    pct, mm = make_observer("percentile", 8, False, percentile=99.9), make_observer("minmax", 8, False)
    pct.update(x)
    mm.update(x)
    assert float(pct.compute().scale) < float(mm.compute().scale) / 20


def test_mse_observer_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    errs = {}
    for name in ("minmax", "mse"):
        obs = make_observer(name, 4, symmetric=True)
        obs.update(x)
        errs[name] = float(((fake_quantize(x, obs.compute()) - x) ** 2).mean())
    assert errs["mse"] < 0.6 * errs["minmax"]


def test_mse_observer_per_channel():
    w = torch.randn(8, 64)
    w[3] *= 10
    obs = make_observer("mse", 8, symmetric=True, axis=0)
    obs.update(w)
    qp = obs.compute()
    assert qp.scale.shape == (8,) and qp.scale[3] > 5 * qp.scale[0]


def test_observer_rejects_nan():
    with pytest.raises(qc.CalibrationError, match="NaN"):
        make_observer("minmax", 8, False).update(torch.tensor([1.0, float("nan")]))


# --- config -----------------------------------------------------------------------------------
def test_conditioning_linears_are_weight_only_and_come_from_the_adapter():
    from qc_compiler.models.adapters.dit import DIT

    with pytest.raises(qc.QCError, match="resolve"):  # the family decides what is quantized
        QuantConfig.preset("w8a8").for_op("blocks.2.attn.qkv", "linear")
    cfg = QuantConfig.preset("w8a8").resolve(DIT)
    assert cfg.weight_only == DIT.conditioning_linears and cfg.include == DIT.quantizable
    spec = cfg.for_op("blocks.2.adaLN_modulation.1", "linear")
    assert spec.weight_bits == 8 and spec.act_bits is None
    assert cfg.for_op("final_layer.adaLN_modulation.1", "linear").act_bits is None
    assert cfg.for_op("blocks.2.attn.qkv", "linear").act_bits == 8
    # an override still decides: quantize one block's adaLN input after all
    assert cfg.override("blocks.2.adaLN_modulation.1", LayerQuant()).for_op("blocks.2.adaLN_modulation.1", "linear").act_bits == 8
    assert QuantConfig.preset("w8a8", weight_only=()).resolve(DIT).for_op("blocks.2.adaLN_modulation.1", "linear").act_bits == 8
    partial = {k: v for k, v in cfg.to_json().items() if k != "weight_only"}  # a key missing is an error, not a default
    with pytest.raises(ValueError, match="exactly the keys"):
        QuantConfig.from_json(partial)
    with pytest.raises(ValueError, match="act_bits"):
        LayerQuant(act_bits=16)
    with pytest.raises(ValueError, match="act_step_groups must be an integer"):
        QuantConfig(act_step_groups=2.5)


def test_quantize_takes_one_of_bits_preset_or_config():
    from qc_compiler.passes import Quantize

    assert Quantize().config.bits == "w8a8" and Quantize(weight_bits=4).config.bits == "w4a8"
    assert Quantize(preset="w4a4").config.bits == "w4a4"
    for kwargs in ({"weight_bits": 4, "preset": "w8a8"}, {"preset": "w8a8", "config": QuantConfig()},
                   {"act_bits": 4, "config": QuantConfig()}):
        with pytest.raises(ValueError, match="one of bits, preset or config"):
            Quantize(**kwargs)
    with pytest.raises(ValueError, match="unknown preset ''"):
        Quantize(preset="")
    with pytest.raises(TypeError):
        Quantize(8, 8)  # keyword-only: which number is which is never guessed


def test_override_mapping_last_match_wins():
    from qc_compiler.models.adapters.dit import DIT

    cfg = QuantConfig.preset("w8a8").resolve(DIT)
    assert cfg.for_op("blocks.0.attn.qkv", "linear").weight_bits == 8
    assert cfg.for_op("t_embedder.mlp.0", "linear") is None  # not included by default
    assert cfg.for_op("blocks.0.attn", "matmul") is None  # matmuls optional, off
    cfg = cfg.override("blocks.*.mlp.*", weight_bits=4).override("blocks.1.mlp.fc2", None).override("op:matmul", LayerQuant())
    assert cfg.for_op("blocks.0.mlp.fc1", "linear").weight_bits == 4
    assert cfg.for_op("blocks.1.mlp.fc2", "linear") is None
    assert cfg.for_op("blocks.0.attn", "matmul").act_bits == 8
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert QuantConfig.preset("W4A8").default.weight_bits == 4
    with pytest.raises(ValueError, match="unknown preset"):
        QuantConfig.preset("w3a3")


# --- the pass ---------------------------------------------------------------------------------
@register_pass
class PoolAll(Pass):
    """Test selector: the whole pool is the calibration set."""

    name = "test_pool_all"
    provides = frozenset({"calibration_set"})

    def __init__(self, labels=(0, 1, 2, 3)):
        self.labels = list(labels)

    def options(self):
        return {"labels": self.labels}

    def run(self, gm, ctx):
        ctx.artifacts["calibration_set"] = collect_pool(ctx, gm, self.labels)
        return PassResult(gm, modified=False)


def quant_modules(cm):
    return [m for m in cm.graph_module.modules() if isinstance(m, (QuantLinear, ActQuant))]


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_insertion_counts_and_small_w8a8_error(mode):
    model, sampler = make_tiny(fused_attn=False), qc.DDPM(steps=4, cfg_scale=1.5)
    cm = qc.compile(model, passes=[PoolAll(), Quantize(weight_bits=8, act_bits=8)], sampler=sampler, capture_mode=mode, backend="fakequant")
    mods = quant_modules(cm)
    # per block: adaLN, qkv, proj, fc1, fc2 (x2 blocks) + final adaLN + final linear; t_embedder stays float
    assert len(mods) == 12 and all(isinstance(m, QuantLinear) for m in mods)
    assert {m.path for m in mods} >= {"blocks.0.attn.qkv", "blocks.1.mlp.fc2", "final_layer.linear"}
    ref, out = sampler.sample(model, [1, 2], seed=0), sampler.sample(cm, [1, 2], seed=0)
    rel = float((out - ref).norm() / ref.norm())
    assert 0.001 < rel < 0.01  # measured 0.0048 (both flavours); 2x margin
    assert "rel.err" in cm.report() and "12 linears W8A8" in cm.report()


def test_w4_has_more_error_than_w8_and_overrides_apply():
    model, sampler = make_tiny(), qc.DDPM(steps=4)
    ref = sampler.sample(model, [3], seed=0)
    errs = {}
    for bits in (8, 4):
        cm = qc.compile(model, passes=[PoolAll(), Quantize(weight_bits=bits, act_bits=8)], sampler=sampler, backend="fakequant")
        errs[bits] = float((sampler.sample(cm, [3], seed=0) - ref).norm() / ref.norm())
    assert errs[4] > 2 * errs[8]
    cfg = QuantConfig.preset("w8a8", attn_matmuls=True).override("final_layer.*", None).override("*.fc2", weight_bits=4)
    cm = qc.compile(make_tiny(fused_attn=False), passes=[PoolAll(), Quantize(config=cfg)], sampler=sampler, backend="fakequant")
    by_path = {m.path: m for m in quant_modules(cm)}
    assert "final_layer.linear" not in by_path and by_path["blocks.0.mlp.fc2"].spec.weight_bits == 4
    assert sum(isinstance(m, ActQuant) for m in by_path.values()) == 8  # 2 matmuls x 2 operands x 2 blocks


def test_fake_quant_module_matches_the_reference_math():
    cm = qc.compile(make_tiny(), passes=[PoolAll(), Quantize(weight_bits=8, act_bits=8)], sampler=qc.DDPM(steps=3), backend="fakequant")
    m = next(m for m in quant_modules(cm) if m.path == "blocks.0.mlp.fc1")
    x = torch.randn(2, 16, 64) * 3
    aq = qparams_from_range(m.a_lo[-1], m.a_hi[-1], 8, symmetric=False)
    wq = m.weight_qparams()
    expected = torch.nn.functional.linear(fake_quantize(x, aq), fake_quantize(m.weight, wq), m.bias)
    torch.testing.assert_close(m(x), expected)


def test_quantize_without_selector_is_an_order_error():
    with pytest.raises(qc.PassOrderError, match="calibration_set"):
        qc.compile(make_tiny(), passes=[Quantize(weight_bits=8, act_bits=8)], sampler=qc.DDPM(steps=3))


def test_nan_calibration_data_is_a_clear_error():
    @graph_pass(name="nan_pool", provides={"calibration_set"})
    def nan_pool(gm, ctx):
        x = torch.randn(4, 1, 16, 16)
        x[2, 0, 3, 3] = float("nan")
        ctx.artifacts["calibration_set"] = CalibrationPool(x, torch.full((4,), 999), torch.zeros(4, dtype=torch.long),
                                                           torch.arange(4), null_label=10, cfg=False)

    with pytest.raises(qc.CalibrationError, match="NaN or inf in 1 of 4 items"):
        qc.compile(make_tiny(), passes=[nan_pool, Quantize(weight_bits=8, act_bits=8)], sampler=qc.DDPM(steps=3))


def test_quantize_inside_cache_regions_and_per_step_groups():
    sampler = qc.DDPM(steps=6)
    cfg = QuantConfig.preset("w8a8", act_step_groups=3)
    cm = qc.compile(make_tiny(), passes=[StepCache(interval=2), PoolAll(), Quantize(config=cfg)], sampler=sampler, backend="fakequant")
    mods = {m.path: m for m in quant_modules(cm)}
    assert len(mods) == 12  # the linears inside the outlined cache regions were found too
    qkv = mods["blocks.0.attn.qkv"]
    assert qkv.a_scale.shape == (4,) and len(set(qkv.a_scale[:3].tolist())) > 1  # 3 groups + all-steps
    seen = []
    qkv.register_forward_pre_hook(lambda mod, args: seen.append(mod.group()))
    sampler.sample(cm, [1], seed=0)
    assert seen == [0, 1, 2]  # computed at steps 0, 2, 4 -> groups 0, 1, 2


def test_save_load_keeps_qparams_without_recalibrating(tmp_path, monkeypatch):
    sampler = qc.DDPM(steps=3)
    cm = qc.compile(make_tiny(), passes=[PoolAll(), Quantize(weight_bits=4, act_bits=8)], sampler=sampler, backend="fakequant")
    cm.save(tmp_path / "m")
    monkeypatch.setattr(Quantize, "_calibrate", lambda *a: (_ for _ in ()).throw(AssertionError("recalibrated")))
    loaded = qc.load_compiled(tmp_path / "m")
    a = {m.path: m for m in quant_modules(cm)}
    b = {m.path: m for m in quant_modules(loaded)}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].w_scale, b[k].w_scale) and torch.equal(a[k].a_scale, b[k].a_scale)
    assert torch.equal(sampler.sample(loaded, [1], seed=0), sampler.sample(cm, [1], seed=0))


def _mse_search_loop(values, lo, hi, bits, symmetric, axis, ratios):
    """The MSE search written as the definition: each ratio's fake-quant error, the first best kept."""
    from qc_compiler.quant.qparams import QParams, fake_quantize, qparams_from_range

    best_err, best = None, None
    for r in ratios:
        qp = qparams_from_range(lo * r, hi * r, bits, symmetric, axis=axis)
        err = (fake_quantize(values, qp) - values) ** 2
        err = err.mean() if axis is None else err.movedim(axis, -1).reshape(-1, values.shape[axis]).mean(dim=0)
        if best_err is None:
            best_err, best = err, qp
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(torch.where(better, qp.scale, best.scale), torch.where(better, qp.zero_point, best.zero_point),
                       bits, symmetric, axis)
    return best


@pytest.mark.parametrize("bits,symmetric,axis", [(8, False, None), (4, True, 0), (8, True, 0), (4, False, None)])
def test_mse_observer_equals_the_ratio_by_ratio_search(bits, symmetric, axis):
    from qc_compiler.quant.observers import make_observer

    gen = torch.Generator().manual_seed(bits + 2 * symmetric)
    x = torch.randn(96, 40, generator=gen) * torch.rand(1, 40, generator=gen) * 3
    x[5, 7], x[60, 1] = 25.0, -40.0  # outliers: clipping pays
    obs = make_observer("mse", bits, symmetric, axis=axis)
    obs.update(x)
    got = obs.compute()
    ref = _mse_search_loop(x, obs.lo, obs.hi, bits, symmetric, axis, obs.ratios)
    assert got.scale.shape == ref.scale.shape and got.zero_point.dtype == ref.zero_point.dtype
    assert torch.allclose(got.scale, ref.scale, rtol=0, atol=0) and torch.equal(got.zero_point, ref.zero_point)
    from qc_compiler.quant.qparams import qparams_from_range

    full = qparams_from_range(obs.lo, obs.hi, bits, symmetric, axis=axis).scale
    assert bool((got.scale <= full).all())
    assert bool((got.scale < full).any()) or bits == 8  # at 4 bits clipping pays somewhere
