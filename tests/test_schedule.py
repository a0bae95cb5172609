import numpy as np
import pytest
import torch

from qc_compiler.diffusion.schedule import Schedule, linear_betas, space_timesteps


def test_linear_betas_endpoints():
    b = linear_betas(1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02) and len(b) == 1000


def test_space_timesteps_matches_dit():
    assert space_timesteps(1000, 4) == {0, 333, 666, 999}
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    # Python rounds half to even, as DiT does: 24.5 -> 24.
    assert space_timesteps(100, [5, 5]) == {0, 12, 24, 37, 49, 50, 62, 74, 87, 99}
    with pytest.raises(ValueError):
        space_timesteps(10, 20)


def test_respaced_betas_and_posterior_by_hand():
    # Hand computation: alpha_bar at kept steps 0, 333, 666, 999 of the 1000-step linear schedule.
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    kept = [0, 333, 666, 999]
    ab = abar[kept]
    expected_betas = [1 - ab[0], 1 - ab[1] / ab[0], 1 - ab[2] / ab[1], 1 - ab[3] / ab[2]]
    s = Schedule.respaced(4)
    np.testing.assert_allclose(s.betas, expected_betas, rtol=1e-12)
    np.testing.assert_array_equal(s.timestep_map, kept)
    np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-12)
    # Posterior variance of q(x_{t-1} | x_t, x_0) at respaced step 2: beta_2 (1 - ab_1) / (1 - ab_2).
    assert s.posterior_variance[2] == pytest.approx(expected_betas[2] * (1 - ab[1]) / (1 - ab[2]), rel=1e-12)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == pytest.approx(np.log(s.posterior_variance[1]))


def test_q_sample_and_predict_xstart_invert():
    s = Schedule.linear()
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 400, 999])
    xt = s.q_sample(x0, t, noise)
    torch.testing.assert_close(s.predict_xstart(xt, t, noise), x0, rtol=1e-4, atol=1e-4)


def test_learned_range_bounds():
    s = Schedule.respaced(10)
    t = torch.tensor([3])
    lo = s.learned_range_log_variance(-torch.ones(1, 1, 2, 2), t)
    hi = s.learned_range_log_variance(torch.ones(1, 1, 2, 2), t)
    assert lo[0, 0, 0, 0].item() == pytest.approx(s.posterior_log_variance_clipped[3], rel=1e-6)
    assert hi[0, 0, 0, 0].item() == pytest.approx(np.log(s.betas[3]), rel=1e-6)


def test_min_snr_weight_caps_only_the_low_noise_steps():
    from qc_compiler.diffusion.losses import hybrid_loss, min_snr_weight

    s = Schedule.linear()
    t = torch.tensor([0, 50, 500, 999])
    w = min_snr_weight(t, s, gamma=5.0)
    snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
    expected = np.minimum(snr[[0, 50, 500, 999]], 5.0) / snr[[0, 50, 500, 999]]
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float32))
    assert w[0] < 1e-3 and w[2] == 1.0 and w[3] == 1.0  # t=0: SNR ~ 1e4; t>=500: SNR < 5
    x0, noise = torch.rand(4, 1, 4, 4) * 2 - 1, torch.randn(4, 1, 4, 4)
    out = torch.cat([torch.zeros_like(noise), torch.zeros_like(noise)], dim=1)
    x_t = s.q_sample(x0, t, noise)
    plain = hybrid_loss(out, x0, x_t, t, noise=noise, schedule=s)
    weighted = hybrid_loss(out, x0, x_t, t, noise=noise, schedule=s, min_snr_gamma=5.0)
    mse = (noise ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(plain - weighted, mse * (1 - w), atol=1e-5)
