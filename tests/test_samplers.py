import pytest
import torch

from qc_compiler.diffusion import DDIM, DDPM, sample_noise


def test_same_seed_same_samples_and_batch_split_independent(tiny):
    s = DDPM(steps=6, cfg_scale=1.5)
    whole = s.sample(tiny, labels=[1, 2, 3, 4], seed=7)
    again = s.sample(tiny, labels=[1, 2, 3, 4], seed=7)
    assert torch.equal(whole, again)
    first = s.sample(tiny, labels=[1, 2], seed=7)
    second = s.sample(tiny, labels=[3, 4], seed=7, sample_offset=2)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(s.sample(tiny, labels=[1, 2, 3, 4], seed=8), whole)


def test_initial_noise_is_the_documented_stream(tiny):
    traj = DDPM(steps=3).sample(tiny, labels=[0, 1], seed=3, record=True)
    assert torch.equal(traj.steps[0].x_t, sample_noise(3, 2, (1, 16, 16)))


def test_trajectory_records_every_step(tiny):
    s = DDPM(steps=5, cfg_scale=2.0)
    traj = s.sample(tiny, labels=[0, 1, 2], seed=0, record=True)
    assert [r.t for r in traj.steps] == s.timesteps == [999, 749, 500, 250, 0]
    assert [r.step for r in traj.steps] == list(range(5))
    assert traj.steps[0].x_t.shape == (3, 1, 16, 16)
    assert traj.steps[0].model_output.shape == (3, 2, 16, 16)
    assert torch.equal(traj.steps[2].y, torch.tensor([0, 1, 2]))
    assert torch.equal(traj.samples, s.sample(tiny, labels=[0, 1, 2], seed=0))


def test_callback_can_modify_the_sample(tiny):
    s = DDIM(steps=4)
    seen = []

    def hook(step, t, x):
        seen.append((step, t))
        return torch.zeros_like(x) if step == 3 else None

    out = s.sample(tiny, labels=[5], seed=0, callback=hook)
    assert seen == [(0, 999), (1, 666), (2, 333), (3, 0)]
    assert torch.equal(out, torch.zeros_like(out))


def test_cfg_calls_a_doubled_batch_with_null_labels(tiny):
    calls = []

    def spy(x, t, y):
        calls.append((x.shape[0], y.tolist(), t.tolist()))
        return tiny(x, t, y)

    spy.num_classes, spy.input_size, spy.in_channels = 10, 16, 1
    DDPM(steps=2, cfg_scale=3.0).sample(spy, labels=[4, 6], seed=0)
    assert calls[0] == (4, [4, 6, 10, 10], [999, 999, 999, 999])
    calls.clear()
    DDPM(steps=2, cfg_scale=1.0).sample(spy, labels=[4, 6], seed=0)
    assert calls[0][0] == 2


def test_cfg_changes_samples(tiny):
    a = DDPM(steps=4, cfg_scale=1.0).sample(tiny, labels=[1], seed=0)
    b = DDPM(steps=4, cfg_scale=4.0).sample(tiny, labels=[1], seed=0)
    assert not torch.allclose(a, b)


def test_ddim_eta0_is_deterministic_given_start(tiny):
    noise = torch.randn(2, 1, 16, 16)
    a = DDIM(steps=5).sample(tiny, labels=[0, 1], seed=0, noise=noise)
    b = DDIM(steps=5).sample(tiny, labels=[0, 1], seed=123, noise=noise)
    assert torch.equal(a, b)
    c = DDPM(steps=5).sample(tiny, labels=[0, 1], seed=0, noise=noise)
    d = DDPM(steps=5).sample(tiny, labels=[0, 1], seed=123, noise=noise)
    assert not torch.equal(c, d)  # DDPM draws fresh noise each step


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="steps"):
        DDPM(steps=0)
    with pytest.raises(ValueError, match="cfg_scale"):
        DDPM(steps=5, cfg_scale=0.5)
    with pytest.raises(ValueError, match="eta"):
        DDIM(steps=5, eta=-1)
