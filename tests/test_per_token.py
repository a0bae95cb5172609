"""Per-token (dynamic) activation quantization: ``LayerQuant(act_granularity="token")``."""
from dataclasses import replace

import pytest
import torch

import qc_compiler as qc
from qc_compiler.backends.torch_int8 import KERNELS, Int8Linear
from qc_compiler.errors import ExportError, PassError
from qc_compiler.passes import Quantize, UniformCalibration
from qc_compiler.quant import LayerQuant, QuantConfig, QuantLinear
from qc_compiler.quant.qparams import fake_quantize, fake_quantize_per_token, qparams_from_range
from conftest import make_tiny

SAMPLER = qc.DDPM(steps=3)


def token_config(bits="w4a4", **kwargs):
    w, a = int(bits[1]), int(bits[3])
    return QuantConfig(default=LayerQuant(w, a, act_granularity="token"), **kwargs)


def passes(config, **options):
    return [UniformCalibration(size=24, pool_labels=4), Quantize(config=config, **options)]


def test_per_token_fake_quant_is_the_per_tensor_rule_row_by_row():
    """Independent of the vectorised code: each row through the per-tensor reference with its own range."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g) * torch.logspace(-3, 2, 6)[:, None] + torch.linspace(-1, 3, 6)[:, None]
    x[2] = x[2].abs()  # an all-positive row: the range widens to include 0
    for bits in (4, 8):
        rows = [fake_quantize(r, qparams_from_range(r.min(), r.max(), bits, symmetric=False)) for r in x]
        torch.testing.assert_close(fake_quantize_per_token(x, bits), torch.stack(rows), rtol=0, atol=1e-6)
    # every row keeps its own resolution: within half a step of its own (0-widened) range, where one
    # grid for the whole tensor is 50x coarser on the smallest row
    own = (x[0].max().clamp(min=0) - x[0].min().clamp(min=None, max=0)) / 15
    assert float((fake_quantize_per_token(x, 4)[0] - x[0]).abs().max()) <= float(own) / 2 + 1e-6
    whole = fake_quantize(x, qparams_from_range(x.min(), x.max(), 4, symmetric=False))
    assert float((whole[0] - x[0]).abs().max()) > 50 * float((fake_quantize_per_token(x, 4)[0] - x[0]).abs().max())
    nan = x.clone()
    nan[3, 5] = float("nan")
    out = fake_quantize_per_token(nan, 4)
    assert out[3].isnan().all() and not out[[0, 1, 2, 4, 5]].isnan().any()  # NaN stays in its row


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("bits,options,vnni", [("w8a8", {}, None), ("w8a8", {}, "0"), ("w4a4", {}, None),
                                               ("w4a4", {"balance": "smoothquant", "low_rank": 4}, None)])
def test_each_per_token_int8_layer_matches_its_fake_quant_layer(kernel, bits, options, vnni, monkeypatch):
    """Every path of the kernel: oneDNN and _int_mm, the split for CPUs without VNNI (8-bit codes above
    64), a balanced input with the low-rank branch beside it."""
    monkeypatch.setenv("QC_INT8_KERNEL", kernel)
    if vnni is not None:
        monkeypatch.setenv("QC_CPU_VNNI", vnni)
    model = make_tiny()
    fq = qc.compile(model, passes=passes(token_config(bits), **options), sampler=SAMPLER, backend="fakequant")
    i8 = qc.compile(model, passes=passes(token_config(bits), **options), sampler=SAMPLER, backend="torch")
    a = {m.path: m for m in fq.graph_module.modules() if isinstance(m, QuantLinear) and not m.weight_only}
    b = {m.path: m for m in i8.graph_module.modules() if isinstance(m, Int8Linear)}
    assert a.keys() == b.keys() and len(b) == 9
    assert any(m.split for m in b.values()) == (vnni == "0" and kernel == "onednn")
    assert all((m.spec.low_rank is not None) == ("low_rank" in options) for m in b.values())
    torch.manual_seed(0)
    with torch.no_grad():
        for path, q in a.items():
            lowered = b[path]
            assert lowered.spec.act.per_token and lowered.post_op == "none" and lowered.requant_consumer is None
            x = torch.randn(3, 16, q.weight.shape[1]) * torch.logspace(-2, 1, 16)[None, :, None]  # tokens 1000x apart
            ref, out = q(x), lowered(x)
            assert float((out - ref).norm() / ref.norm()) < 1e-4
    assert "per-token activations" in i8.report() and "act per token" in fq.report()


def test_fusions_skip_per_token_layers_on_either_side(monkeypatch):
    """fc1 -> GELU -> fc2 fuses into one kernel writing fc2's codes only when both take per-tensor input:
    a per-token fc1 must rescale before its GELU, and a per-token fc2 takes float input."""
    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        pytest.skip("this PyTorch build has no oneDNN INT8 linear")
    monkeypatch.setenv("QC_INT8_KERNEL", "onednn")
    monkeypatch.setenv("QC_CPU_VNNI", "1")
    model, bits = make_tiny(), "w4a8"
    layers = lambda cfg: {m.path.rsplit(".", 1)[-1]: m for m in qc.compile(  # noqa: E731
        model, passes=passes(cfg), sampler=SAMPLER, backend="torch").graph_module.modules()
        if isinstance(m, Int8Linear) and ".0.mlp." in m.path}
    plain = layers(QuantConfig.preset(bits))
    assert plain["fc1"].post_op == "gelu_tanh" and plain["fc1"].requant_consumer is plain["fc2"]
    fc2_token = layers(QuantConfig.preset(bits).override("*.fc2", act_granularity="token"))
    assert fc2_token["fc1"].post_op == "gelu_tanh" and fc2_token["fc1"].requant_consumer is None
    fc1_token = layers(token_config(bits).override("*.fc2", act_granularity="tensor"))
    assert fc1_token["fc1"].post_op == "none" and fc1_token["fc1"].requant_consumer is None
    assert not fc1_token["fc2"].spec.act.per_token


def test_per_token_beats_per_tensor_where_tokens_differ_and_samples_match_the_reference():
    """At W4A4 on tokens of very different size, the per-tensor grid (calibrated on the same data)
    flushes the small tokens; per token keeps them. And whole sampling runs agree across backends."""
    model = make_tiny()
    tensor = qc.compile(model, passes=passes(QuantConfig.preset("w4a4")), sampler=SAMPLER, backend="fakequant")
    token = qc.compile(model, passes=passes(token_config()), sampler=SAMPLER, backend="fakequant")
    pick = lambda cm: next(m for m in cm.graph_module.modules() if isinstance(m, QuantLinear) and m.path.endswith("0.mlp.fc1"))  # noqa: E731
    qt, qk = pick(tensor), pick(token)
    x = torch.randn(2, 16, qt.weight.shape[1]) * torch.logspace(-2, 0, 16)[None, :, None]
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, qt.weight, qt.bias)
        err = lambda q: float((q(x) - ref)[:, :8].norm() / ref[:, :8].norm())  # noqa: E731  (the small tokens)
        assert err(qk) < 0.5 * err(qt)
    i8 = qc.compile(model, passes=passes(token_config()), sampler=SAMPLER, backend="torch")
    a, b = SAMPLER.sample(token, [1, 2, 3], seed=0), SAMPLER.sample(i8, [1, 2, 3], seed=0)
    assert float((a - b).norm() / a.norm()) < 1e-3


def test_per_token_runs_with_brecq_and_saves(tmp_path, monkeypatch):
    """BRECQ's soft forward quantizes the inputs per token (the per-token rule runs while gradients
    flow), it learns codes of its own, and the artefact reloads bit for bit."""
    import qc_compiler.quant.fake_quant as fake_quant

    graded, rule = [], fake_quant.fake_quantize_per_token
    monkeypatch.setattr(fake_quant, "fake_quantize_per_token",
                        lambda x, bits: graded.append(torch.is_grad_enabled()) or rule(x, bits))
    model = make_tiny()
    brecq = qc.compile(model, passes=passes(token_config("w4a8"), rounding="brecq", brecq={"iters": 40}),
                       sampler=SAMPLER, backend="torch")
    assert sum(graded) >= 40  # every learning step of every block ran the per-token rule
    nearest = qc.compile(model, passes=passes(token_config("w4a8")), sampler=SAMPLER, backend="torch")
    assert not torch.equal(SAMPLER.sample(brecq, [4, 5], seed=0), SAMPLER.sample(nearest, [4, 5], seed=0))
    brecq.save(tmp_path / "m")
    assert '"act_granularity": "token"' in (tmp_path / "m" / "manifest.json").read_text()
    back = qc.load_compiled(tmp_path / "m")
    assert torch.equal(SAMPLER.sample(back, [4, 5], seed=0), SAMPLER.sample(brecq, [4, 5], seed=0))
    with pytest.raises(ExportError, match="per-token activations"):  # the spec-level refusal of the exporter
        back.export_onnx(tmp_path / "m.onnx")


def test_config_round_trip_and_refusals():
    plain = QuantConfig.preset("w4a8")
    assert "act_granularity" not in plain.to_json()["default"]  # configs saved before it read the same
    assert QuantConfig.from_json(plain.to_json()) == plain
    token = token_config().override("*.fc2", act_granularity="tensor")
    assert token.to_json()["default"]["act_granularity"] == "token"
    assert QuantConfig.from_json(token.to_json()) == token
    from qc_compiler.models.adapters.dit import DIT
    resolved = token.resolve(DIT)
    assert resolved.for_op("blocks.0.attn.qkv", "linear").per_token
    assert not resolved.for_op("blocks.0.mlp.fc2", "linear").per_token
    assert resolved.for_op("blocks.0.adaLN_modulation.1", "linear").act_bits is None  # weight-only stays so
    with pytest.raises(ValueError, match="act_granularity must be one of"):
        LayerQuant(act_granularity="channel")
    with pytest.raises(ValueError, match="nothing to observe"):
        LayerQuant(act_observer="mse", act_granularity="token")
    with pytest.raises(ValueError, match="weight-only"):
        LayerQuant(act_bits=None, act_granularity="token")
    with pytest.raises(ValueError, match="use one or the other"):
        token_config(act_step_groups=4)
    with pytest.raises(ValueError, match="drop act_lr"):
        Quantize(config=token_config(), rounding="brecq", brecq={"act_lr": 1e-3})
    # with some layers per tensor, groups and learned step sizes serve those: allowed
    mixed = token_config().override("*.fc2", act_granularity="tensor")
    assert replace(mixed, act_step_groups=4).act_step_groups == 4
    Quantize(config=mixed, rounding="brecq", brecq={"act_lr": 1e-3})
    with pytest.raises(PassError, match="per-token ranges are for linear inputs"):
        qc.compile(make_tiny(fused_attn=False), passes=passes(token_config(attn_matmuls=True)), sampler=SAMPLER,
                   backend="fakequant")
    from qc_compiler.tools.bench import Variant
    with pytest.raises(ValueError, match="drop them or mixed"):
        Variant(selector="uniform", mixed=4, act_granularity="token")
    # on a preset, from Python or the command line; a full config carries its own
    from qc_compiler.cli import parse_pass_spec
    q = parse_pass_spec('quantize:preset="w4a4",act_granularity="token"')
    assert q.config.default == LayerQuant(4, 4, act_granularity="token") and q.options()["config"] == token_config().to_json()
    assert Quantize(act_observer="mse").config.default.act_observer == "mse"
    with pytest.raises(ValueError, match="with a full config, set them in its LayerQuant"):
        Quantize(config=QuantConfig.preset("w4a4"), act_granularity="token")
    with pytest.raises(ValueError, match="act_granularity must be one of"):
        Quantize(preset="w4a4", act_granularity="row")


@pytest.mark.parametrize("backend", ["onnx", "inductor"])
def test_backends_with_constant_scales_refuse_per_token_before_any_work(backend):
    with pytest.raises(ExportError, match="per-token activations"):
        qc.compile(make_tiny(), passes=passes(token_config("w8a8")), sampler=SAMPLER, backend=backend)


def test_balance_search_scores_candidates_with_the_quantizer_the_layer_runs(monkeypatch):
    """A per-token layer's balance search scores per token (the figure it moved: W4A4 1.43 -> 1.32 FID,
    docs/RESULTS.md); a per-tensor layer's, per tensor. Checked against the formula, then through the pass."""
    from qc_compiler.quant import balance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g) * torch.logspace(-1, 1, 64)[:, None]
    w, s = torch.randn(8, 16, generator=g), torch.rand(16, generator=g) + 0.5
    xb = x / s
    wq = fake_quantize(w * s, qparams_from_range(-(w * s).abs().amax(1), (w * s).abs().amax(1), 4, symmetric=True, axis=0))
    ref = x @ w.T
    expect = float((fake_quantize_per_token(xb, 4) @ wq.T - ref).norm() / ref.norm())
    got = balance.quantized_output_error(x, w, s, 4, 4, "minmax", per_token=True)
    assert abs(got - expect) < 1e-6 and abs(balance.quantized_output_error(x, w, s, 4, 4, "minmax") - expect) > 1e-3
    seen, search = [], balance.balance_scales
    import qc_compiler.quant.fake_quant as fake_quant
    monkeypatch.setattr(fake_quant, "balance_scales", lambda *a, **kw: seen.append(kw["per_token"]) or search(*a, **kw))
    cfg = token_config("w4a4").override("*.fc2", act_granularity="tensor")
    qc.compile(make_tiny(), passes=passes(cfg, balance="search"), sampler=SAMPLER, backend="fakequant")
    assert len(seen) == 9 and seen.count(False) == 2  # the two fc2 layers per tensor, the rest per token
