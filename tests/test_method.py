"""Tests that fail when the method breaks: a known drift that VC must undo, clusters TAP must cover,
the INT8 rounding rule, and the quality runs themselves on a tiny model."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import qc_compiler as qc
from qc_compiler.calibration import SELECTORS
from qc_compiler.passes import UniformCalibration, VarianceCompensation
from qc_compiler.pipeline import Pass, PassResult, register_pass
from qc_compiler.specs import rescale
from qc_compiler.step import StepAware
from conftest import make_tiny

STEPS = 6
# A known per-step, per-channel spread drift (steps x 2 channels), far from 1 and varying by step.
DRIFT = torch.tensor([[1.0, 1.0], [1.3, 0.8], [0.7, 1.4], [1.5, 1.2], [0.6, 0.9], [1.25, 0.75]])


class _DriftOutput(StepAware, nn.Module):
    """Scales the predicted-noise channels' spread around their per-sample mean by DRIFT[step]."""

    def forward(self, out):
        if self.step_state is None or self.step_state.step < 0:
            return out
        c = DRIFT.shape[1]
        return torch.cat([rescale(out[:, :c], DRIFT[self.step_state.step]), out[:, c:]], dim=1)


class _DriftSample(StepAware, nn.Module):
    """A sampler step hook that scales x_t's spread by DRIFT[step] after each update."""

    def __call__(self, step, t, x):  # type: ignore[override]
        return rescale(x, DRIFT[step])


@register_pass
class InjectDrift(Pass):
    """Test-only: a drift of known size, where quantization plus caching would put an unknown one."""

    name = "test_inject_drift"

    def __init__(self, where: str = "eps"):
        self.where = where

    def options(self):
        return {"where": self.where}

    def run(self, gm, ctx):
        if self.where == "sample":
            gm.meta.setdefault("qc.sample_hooks", []).append(_DriftSample())
            return PassResult(gm, modified=False)
        gm.add_submodule("drift", _DriftOutput())
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            node = gm.graph.call_module("drift", (out.args[0],))
        out.args = (node,)
        return PassResult(gm, modified=True)


def _per_step_spread(traj):
    """Per step and channel: the mean over samples of the per-sample spatial variance of x_t."""
    return torch.stack([r.x_t.var(dim=(2, 3)).mean(dim=0) for r in traj.steps] +
                       [traj.samples.var(dim=(2, 3)).mean(dim=0)])


@pytest.mark.parametrize("form", ["variance", "exact"])
@pytest.mark.parametrize("placement", ["eps", "sample"])
def test_vc_recovers_a_known_drift_and_closes_the_variance_gap(placement, form):
    model, sampler = make_tiny(in_channels=2), qc.DDPM(steps=STEPS, cfg_scale=1.5)
    calib = lambda: UniformCalibration(size=12, pool_labels=4)  # noqa: E731
    drifted = qc.compile(model, passes=[InjectDrift(placement), calib()], sampler=sampler)
    fixed = qc.compile(model, passes=[InjectDrift(placement), calib(),
                                      VarianceCompensation(placement=placement, form=form, batch=8, k_range=None)],
                       sampler=sampler)
    table = next(m.export_spec() for m in list(fixed.graph_module.modules()) + fixed.step_hooks
                 if hasattr(m, "export_spec") and getattr(m.export_spec(), "placement", None) == placement)
    # every step's K undoes that step's drift: the fit saw inputs corrected by the earlier K
    torch.testing.assert_close(table.k, 1.0 / DRIFT, rtol=2e-3, atol=2e-3)
    labels = [0, 3, 5, 7, 9, 2]
    ref = _per_step_spread(sampler.sample(model, labels, seed=11, record=True))
    bad = _per_step_spread(sampler.sample(drifted, labels, seed=11, record=True))
    good = _per_step_spread(sampler.sample(fixed, labels, seed=11, record=True))
    gap_bad, gap_good = (bad - ref).abs().sum(), (good - ref).abs().sum()
    assert gap_bad > 0.05 and gap_good < 1e-3 * gap_bad  # new noise and labels, the gap is closed


# --- TAP -------------------------------------------------------------------------------------------
SIZES = (400, 200, 100, 50, 12)  # clusters of very different sizes, each at its own step


def clustered(seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(SIZES), 24)) * 4
    x = np.concatenate([c + rng.normal(size=(n, 24)) for c, n in zip(centers, SIZES)]).astype(np.float32)
    truth = np.repeat(np.arange(len(SIZES)), SIZES)
    steps = np.repeat(10 * np.arange(len(SIZES)), SIZES)  # TAP's temporal term also separates steps
    return x, steps, truth


def test_tap_covers_every_cluster_in_proportion_where_a_random_draw_misses_the_small_ones():
    x, steps, truth = clustered()
    size = 30
    counts = np.bincount(truth[SELECTORS["tap"](x, steps, size=size, seed=0, clusters=len(SIZES), n_jobs=1)],
                         minlength=len(SIZES))
    assert counts.sum() == size and counts.min() >= 3  # 3..10 per cluster
    assert list(counts) == sorted(counts, reverse=True)  # in proportion to the cluster sizes
    # A random draw of 30 of the 762 gives the 12-item cluster >= 3 items with probability
    # P(X >= 3), X ~ Hypergeometric(762, 12, 30): about 1.1%. So this fails a random selector 99% of the time.
    n, k = sum(SIZES), SIZES[-1]
    p_ok = 1 - sum(math.comb(k, i) * math.comb(n - k, size - i) / math.comb(n, size) for i in range(3))
    assert p_ok < 0.02
    random_counts = np.bincount(truth[SELECTORS["random"](x, steps, size=size, seed=0)], minlength=len(SIZES))
    assert random_counts[-1] < 3  # the draw this seed makes is one of the 99%


def test_tap_alpha_weighs_features_against_steps():
    x, steps, _ = clustered()
    shuffled_steps = np.random.default_rng(1).permutation(steps)  # steps now say nothing about the clusters
    pick = lambda alpha: set(SELECTORS["tap"](x, shuffled_steps, size=30, seed=0, clusters=5, alpha=alpha, n_jobs=1))  # noqa: E731
    assert pick(0.0) != pick(1.0) and pick(1.0) == pick(1.0)


# --- the INT8 kernels' rounding ------------------------------------------------------------------
def test_int8_activation_codes_round_half_to_even_as_the_reference():
    from qc_compiler.backends.torch_int8 import _quantize_u8
    from qc_compiler.quant.qparams import QParams, quantize

    scale, zero = 0.5, 10
    x = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, 2.0]])  # x/s = 0.5, 1.5, 2.5, -0.5, -1.5, 4.0
    codes = _quantize_u8(x, scale, zero, 255)
    assert codes.tolist() == [[10, 12, 12, 10, 8, 14]]  # ties to even: 0, 2, 2, -0, -2, then + zero
    ref = quantize(x, QParams(torch.tensor(scale), torch.tensor(zero, dtype=torch.int32), 8, symmetric=False))
    assert torch.equal(codes.long(), ref.long())


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
def test_int_mm_pads_small_batches_and_matches_the_reference(rows, monkeypatch):
    """torch._int_mm wants more than 16 rows: the kernel pads; the padding must not leak into the result."""
    monkeypatch.setenv("QC_INT8_KERNEL", "int_mm")
    from qc_compiler.backends.torch_int8 import Int8Linear
    from qc_compiler.quant import QuantLinear

    sampler = qc.DDPM(steps=3)
    passes = lambda: [UniformCalibration(size=12, pool_labels=4), qc.passes.Quantize(preset="w8a8")]  # noqa: E731
    fq = qc.compile(make_tiny(), passes=passes(), sampler=sampler, backend="fakequant")
    i8 = qc.compile(make_tiny(), passes=passes(), sampler=sampler, backend="torch")
    q = next(m for m in fq.graph_module.modules() if isinstance(m, QuantLinear) and m.path == "blocks.0.attn.qkv")
    lowered = next(m for m in i8.graph_module.modules() if isinstance(m, Int8Linear) and m.path == "blocks.0.attn.qkv")
    assert lowered.kernel == "int_mm"
    x = torch.randn(rows, q.weight.shape[1])
    out, ref = lowered(x), q(x)
    assert out.shape == ref.shape == (rows, q.weight.shape[0])
    step = float(lowered.export_spec().act.a_scale[-1]) * float(q.weight.detach().abs().sum(dim=1).max())
    assert (out - ref).abs().max() <= step


# --- the quality runs themselves -----------------------------------------------------------------
@pytest.mark.slow
def test_run_variants_compiles_samples_and_scores_for_real():
    from qc_compiler.specs import StepCacheConfig
    from qc_compiler.tools.bench import run_variants

    torch.manual_seed(0)
    model = qc.load_model("DiT-T/4", input_size=32, in_channels=1, num_classes=10)
    with torch.no_grad():  # DiT's zero init: make every block matter
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
    rows = run_variants(["fp32", "cache", "quant-uniform"], model=model, n=12, steps=4, cfg=1.5, batch=12,
                        cache=StepCacheConfig(interval=2), size=12, pool_labels=4)
    assert [r["variant"] for r in rows] == ["fp32", "cache", "quant-uniform"]
    for r in rows:
        assert r["n"] == 12 and math.isfinite(r["fid"]) and 0 <= r["class_acc"] <= 1 and r["sample_s"] > 0
    assert rows[0]["speed_vs_fp32"] == 1.0 and rows[1]["cache"] == "interval 2" and rows[2]["bits"] == "w8a8"
    assert rows[1]["fid"] != rows[0]["fid"]  # the cache changed the samples, and the suite saw it
    # fidelity: each row after FP32 against FP32's samples from the same noise
    assert "fid_vs_fp32" not in rows[0] and rows[1]["rmse_vs_fp32"] > 0 and rows[2]["rmse_vs_fp32"] > 0
    assert all(0 <= r["agree_vs_fp32"] <= 1 for r in rows[1:])
    from qc_compiler.tools.bench import markdown

    table = markdown(rows, 12, 1.5)
    assert "RMSE to FP32" in table and f"{rows[1]['rmse_vs_fp32']:.4f}" in table
