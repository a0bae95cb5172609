import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

import qc_compiler as qc
from qc_compiler.passes import StepCache, UniformCalibration, VarianceCompensation
from qc_compiler.passes.vc import VCRescale, VCSampleHook, fit_k
from qc_compiler.specs import VCConfig, VCTable
from qc_compiler.specs import rescale as apply_k
from conftest import make_tiny


def objective(k, x_hat, x_ref, mask_eps=0.1):
    mu = x_hat.mean(axis=(2, 3), keepdims=True)
    xt = mu + k * (x_hat - mu)
    threshold = mask_eps * np.sqrt(np.mean(x_ref ** 2))  # relative to the channel's RMS, as fit_k
    inv = np.where(np.abs(x_ref) >= threshold, 1 / x_ref, 0.0)
    return np.sum(((xt - x_ref) * inv) ** 2) + np.sum((xt - x_ref) ** 2)


def test_closed_form_matches_numerical_minimum():
    rng = np.random.default_rng(0)
    x_ref = rng.normal(0.3, 1.0, (16, 3, 4, 4))
    x_hat = 0.2 + 1.3 * (x_ref - 0.3) + 0.1 * rng.normal(size=x_ref.shape)
    k = fit_k(torch.from_numpy(x_hat), torch.from_numpy(x_ref)).numpy()
    for c in range(3):
        res = minimize_scalar(lambda v: objective(v, x_hat[:, c:c + 1], x_ref[:, c:c + 1]), bounds=(0, 3), method="bounded",
                              options={"xatol": 1e-10})
        assert k[c] == pytest.approx(res.x, rel=1e-5)


def test_k_is_one_when_prediction_equals_reference():
    x = torch.randn(8, 2, 5, 5)
    torch.testing.assert_close(fit_k(x, x), torch.ones(2))
    centred = x - x.mean(dim=(2, 3), keepdim=True)  # the paper's printed form is only exact when mu = 0
    torch.testing.assert_close(fit_k(centred, centred, form="paper"), torch.ones(2), rtol=1e-5, atol=1e-5)


def test_known_variance_scaling_is_recovered():
    torch.manual_seed(0)
    x_ref = torch.randn(64, 2, 8, 8) * 0.5
    x_ref = x_ref - x_ref.mean(dim=(2, 3), keepdim=True) + 0.0  # per-sample means 0: the drift is pure variance
    x_hat = x_ref * torch.tensor([1.25, 0.8]).view(1, 2, 1, 1)
    k = fit_k(x_hat, x_ref)
    torch.testing.assert_close(k, torch.tensor([0.8, 1.25]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_k(x_hat, k).var(), x_ref.var(), rtol=0.05, atol=0.0)


def test_variance_form_matches_spread_where_least_squares_shrinks_it():
    # x_hat = 1.5 x' + independent noise: the least-squares K is a regression slope, so the corrected
    # variance falls to corr^2 * var(x'); the variance form restores var(x') whatever the correlation.
    torch.manual_seed(2)
    x_ref = torch.randn(64, 2, 8, 8)
    x_hat = 1.5 * x_ref + torch.randn_like(x_ref)
    centred_var = lambda x: (x - x.mean(dim=(2, 3), keepdim=True)).var()
    exact = apply_k(x_hat, fit_k(x_hat, x_ref))
    matched = apply_k(x_hat, fit_k(x_hat, x_ref, form="variance"))
    assert float(centred_var(exact)) < 0.85 * float(centred_var(x_ref))
    torch.testing.assert_close(centred_var(matched), centred_var(x_ref), rtol=1e-4, atol=0.0)
    torch.testing.assert_close(fit_k(x_ref, x_ref, form="variance"), torch.ones(2))


def test_paper_form_equals_exact_when_mean_is_zero():
    torch.manual_seed(1)
    x_ref = torch.randn(32, 1, 6, 6)
    x_hat = 1.4 * x_ref
    x_hat = x_hat - x_hat.mean(dim=(2, 3), keepdim=True)  # mu = 0 per sample
    x_ref2 = x_ref - x_ref.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(fit_k(x_hat, x_ref2, "paper"), fit_k(x_hat, x_ref2, "exact"))
    shifted = x_hat + 0.5  # with a non-zero mean the two forms differ
    assert float(fit_k(shifted, x_ref, "paper")) != pytest.approx(float(fit_k(shifted, x_ref, "exact")), rel=1e-3)
    with pytest.raises(ValueError, match="form"):
        fit_k(x_hat, x_ref, form="other")


def test_rescale_node_indexes_by_step_and_keeps_sigma_channels():
    cm = qc.compile(make_tiny(), sampler=qc.DDPM(steps=3))
    node = VCRescale(3, 1, VCConfig(form="exact", mask_eps=1e-3))
    node.k[:, 0] = torch.tensor([1.0, 2.0, 0.5])
    node.bind_step_state(cm.step_state)
    out = torch.randn(2, 2, 4, 4)
    for step, k in enumerate([1.0, 2.0, 0.5]):
        cm.step_state.step = step
        res = node(out)
        torch.testing.assert_close(res[:, :1], apply_k(out[:, :1], torch.tensor([k])))
        assert torch.equal(res[:, 1:], out[:, 1:])
        torch.testing.assert_close(node.export_spec().apply(out, step), res)  # the spec is the same formula


@pytest.mark.parametrize("placement", ["eps", "sample"])
def test_pass_fits_saves_and_reloads_k(placement, tmp_path, monkeypatch):
    sampler = qc.DDPM(steps=5, cfg_scale=1.5)
    passes = [StepCache(interval=2), UniformCalibration(size=20, pool_labels=4), VarianceCompensation(placement=placement, batch=8)]
    cm = qc.compile(make_tiny(), passes=passes, sampler=sampler)
    table = next(m for m in cm.graph_module.modules() if isinstance(m, (VCRescale, VCSampleHook)))
    assert table.k.shape == (5, 1) and not torch.allclose(table.k, torch.ones(5, 1))
    if placement == "sample":
        assert cm.step_hooks == [table]
    assert "variance compensation" in cm.report() and "mean |K-1|" in cm.report()
    cm.save(tmp_path / "m")
    from qc_compiler.pipeline import PassContext

    monkeypatch.setattr(PassContext, "collect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("refit")))
    monkeypatch.setattr(VarianceCompensation, "_run_current", lambda *a: (_ for _ in ()).throw(AssertionError("refit")))
    loaded = qc.load_compiled(tmp_path / "m")
    table2 = next(m for m in loaded.graph_module.modules() if isinstance(m, type(table)))
    assert torch.equal(table.k, table2.k)
    assert torch.equal(sampler.sample(loaded, [1, 2], seed=3), sampler.sample(cm, [1, 2], seed=3))


def test_vc_without_calibration_set_is_an_order_error():
    with pytest.raises(qc.PassOrderError, match="calibration_set"):
        qc.compile(make_tiny(), passes=[VarianceCompensation()], sampler=qc.DDPM(steps=3))


def test_k_range_clamps_degenerate_fits():
    torch.manual_seed(0)
    x_ref, x_hat = torch.randn(8, 1, 6, 6), torch.randn(8, 1, 6, 6)  # unrelated: the unclamped K is near 0
    assert abs(float(fit_k(x_hat, x_ref))) < 0.3
    assert float(fit_k(x_hat, x_ref, k_range=(0.5, 2.0))) == 0.5


def test_bad_options():
    with pytest.raises(ValueError, match="placement"):
        VarianceCompensation(placement="logits")
    with pytest.raises(ValueError, match="batch"):
        VarianceCompensation(batch=1)
    with pytest.raises(ValueError, match="k_range"):
        VarianceCompensation(k_range=(1.5, 2.0))
    with pytest.raises(ValueError, match="batch must be an integer"):
        VarianceCompensation(batch=8.5)
    with pytest.raises(ValueError, match="finite"):
        VarianceCompensation(mask_eps=float("inf"))
    with pytest.raises(ValueError, match="not both"):
        VarianceCompensation(VCConfig(), form="exact")


def test_vc_table_is_serialisable():
    table = VCTable("eps", torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    again = VCTable.from_json(table.to_json())
    assert again.placement == "eps" and torch.equal(again.k, table.k)
    with pytest.raises(ValueError, match="steps, channels"):
        VCTable("eps", torch.ones(3))


def test_default_form_is_the_variance_ratio_in_the_pass_and_the_qandc_preset():
    """The measured best form (docs/RESULTS.md); the paper's least-squares forms stay selectable."""
    from qc_compiler.presets import qandc

    assert VarianceCompensation().form == "variance" and qandc()[-1].form == "variance"
    assert qandc(vc=VCConfig(form="exact"))[-1].form == "exact"
    assert [p.name for p in qandc(vc=None)][-1] == "quantize"  # VC off
