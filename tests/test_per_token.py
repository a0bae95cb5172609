"""Per-token (dynamic) activation quantization: ``LayerQuant(act_granularity="token")``."""
import pytest
import torch

import qc_compiler as qc
from qc_compiler.backends.torch_int8 import KERNELS, Int8Linear
from qc_compiler.errors import ExportError
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
@pytest.mark.parametrize("bits,balance", [("w8a8", None), ("w4a4", None), ("w4a4", "smoothquant")])
def test_each_per_token_int8_layer_matches_its_fake_quant_layer(kernel, bits, balance, monkeypatch):
    monkeypatch.setenv("QC_INT8_KERNEL", kernel)
    model, opts = make_tiny(), {"balance": balance} if balance else {}
    fq = qc.compile(model, passes=passes(token_config(bits), **opts), sampler=SAMPLER, backend="fakequant")
    i8 = qc.compile(model, passes=passes(token_config(bits), **opts), sampler=SAMPLER, backend="torch")
    a = {m.path: m for m in fq.graph_module.modules() if isinstance(m, QuantLinear) and not m.weight_only}
    b = {m.path: m for m in i8.graph_module.modules() if isinstance(m, Int8Linear)}
    assert a.keys() == b.keys() and len(b) == 9
    torch.manual_seed(0)
    with torch.no_grad():
        for path, q in a.items():
            lowered = b[path]
            assert lowered.spec.act.per_token and lowered.post_op == "none" and lowered.requant_consumer is None
            x = torch.randn(3, 16, q.weight.shape[1]) * torch.logspace(-2, 1, 16)[None, :, None]  # tokens 1000x apart
            ref, out = q(x), lowered(x)
            # within one activation step of each token's own grid, times the weights' largest row sum
            xs = x / q.in_scale if balance else x
            step = (xs.amax(-1, keepdim=True).clamp(min=0) - xs.amin(-1, keepdim=True).clamp(max=0)) / (2 ** q.spec.act_bits - 1)
            w = q.w_fq * (q.in_scale if balance else 1)
            assert ((out - ref).abs() <= step * w.abs().sum(dim=1).max() + 1e-5).all()
            assert float((out - ref).norm() / ref.norm()) < 1e-4
    assert "per-token activations" in i8.report() and "act per token" in fq.report()


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


def test_per_token_runs_with_gptq_and_brecq_and_saves(tmp_path):
    """GPTQ's Hessian and BRECQ's soft mode both see the per-token input; the artefact reloads bit for bit."""
    model = make_tiny()
    brecq = qc.compile(model, passes=passes(token_config("w4a8"), rounding="brecq", brecq={"iters": 40}),
                       sampler=SAMPLER, backend="torch")
    gptq = qc.compile(model, passes=passes(token_config("w4a8"), rounding="gptq"), sampler=SAMPLER, backend="torch")
    nearest = qc.compile(model, passes=passes(token_config("w4a8")), sampler=SAMPLER, backend="torch")
    ref = SAMPLER.sample(model, [4, 5], seed=0)
    for cm in (brecq, gptq):  # both choose codes of their own
        assert not torch.equal(SAMPLER.sample(cm, [4, 5], seed=0), SAMPLER.sample(nearest, [4, 5], seed=0))
    gptq.save(tmp_path / "m")
    assert '"act_granularity": "token"' in (tmp_path / "m" / "manifest.json").read_text()
    back = qc.load_compiled(tmp_path / "m")
    assert torch.equal(SAMPLER.sample(back, [4, 5], seed=0), SAMPLER.sample(gptq, [4, 5], seed=0))
    assert float((SAMPLER.sample(back, [4, 5], seed=0) - ref).norm() / ref.norm()) < 0.2


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
