import json

import numpy as np
import pytest
import torch

from qc_compiler.diffusion.flow import FlowMatchEuler
from qc_compiler.diffusion.samplers import SAMPLERS, sample_noise, sampler_from_spec

diffusers = pytest.importorskip("diffusers")
Scheduler = diffusers.FlowMatchEulerDiscreteScheduler

STEPS = 28
# (our sampler's options, the scheduler's config, set_timesteps' arguments) as SD3 and Flux use them
CASES = {
    "shift1": (dict(), dict(), dict(num_inference_steps=STEPS)),
    "sd3": (dict(shift=3.0), dict(shift=3.0), dict(num_inference_steps=STEPS)),
    "flux": (dict(mu=1.15, flux_sigmas=True), dict(use_dynamic_shifting=True),
             dict(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=1.15)),
}


def scheduler(case):
    _, config, set_args = CASES[case]
    s = Scheduler(num_train_timesteps=1000, **config)
    s.set_timesteps(**set_args)
    return s


class Velocity(torch.nn.Module):
    """A tiny deterministic velocity 'model' that depends on x, t and the label."""

    num_classes = 10
    sample_shape = (2, 4, 4)

    def __init__(self, dtype=torch.float32, learned_sigma=False):
        super().__init__()
        self.dtype, self.learned_sigma = dtype, learned_sigma

    def forward(self, x, t, y):
        v = 0.1 * x.float() + t.float().view(-1, 1, 1, 1) / 1000 + 0.03 * y.float().view(-1, 1, 1, 1)
        if self.learned_sigma:
            v = torch.cat([v, torch.full_like(v, 7.0)], dim=1)
        return v.to(self.dtype)


def reference_loop(case, model, x, y, cfg_scale=1.0, null_label=10):
    """diffusers' denoising loop by hand: x before each step, then the final sample."""
    s = scheduler(case)
    xs, n = [], x.shape[0]
    for t in s.timesteps:
        xs.append(x)
        if cfg_scale == 1.0:
            v = model(x, t.expand(n), y)
        else:
            out = model(torch.cat([x, x]), t.expand(2 * n), torch.cat([y, torch.full_like(y, null_label)]))
            cond, uncond = out[:n], out[n:]
            v = uncond + cfg_scale * (cond - uncond)
        x = s.step(v, t, x).prev_sample
    return xs, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigmas_and_timesteps_equal_the_schedulers(case):
    ours, ref = FlowMatchEuler(STEPS, **CASES[case][0]), scheduler(case)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas[-1].item() == 0.0
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(torch.tensor(ours.timesteps, dtype=torch.float32), ref.timesteps)
    assert ours.timesteps == ref.timesteps.tolist() and all(type(t) is float for t in ours.timesteps)
    assert ours.schedule is None  # no DDPM betas built


@pytest.mark.parametrize("case", ["sd3", "flux"])
def test_every_step_equals_the_schedulers_loop(case):
    model, y = Velocity(), torch.tensor([0, 3, 9])
    noise = sample_noise(5, 3, model.sample_shape)
    sampler = FlowMatchEuler(STEPS, **CASES[case][0])
    traj = sampler.sample(model, y, noise=noise, record=True)
    xs, final = reference_loop(case, model, noise, y)
    assert len(traj.steps) == len(xs) == STEPS
    for rec, x, t in zip(traj.steps, xs, sampler.timesteps):
        assert torch.equal(rec.x_t, x) and rec.t == t
        assert torch.equal(rec.model_output, model(x, torch.full((3,), t), y))
    assert torch.equal(traj.samples, final)
    assert torch.equal(sampler.sample(model, y, noise=noise), final)
    assert not torch.allclose(final, noise)  # it moved


def test_cfg_equals_the_guided_loop_by_hand():
    model, y = Velocity(), torch.tensor([1, 2])
    noise = sample_noise(0, 2, model.sample_shape)
    traj = FlowMatchEuler(STEPS, 4.0, shift=3.0).sample(model, y, noise=noise, record=True)
    xs, final = reference_loop("sd3", model, noise, y, cfg_scale=4.0)
    assert all(torch.equal(r.x_t, x) for r, x in zip(traj.steps, xs))
    assert torch.equal(traj.samples, final)
    assert not torch.equal(final, reference_loop("sd3", model, noise, y)[1])  # guidance mattered


def test_half_precision_output_is_cast_back_like_the_scheduler():
    model, y = Velocity(dtype=torch.bfloat16), torch.tensor([4])
    noise = sample_noise(1, 1, model.sample_shape)
    out = FlowMatchEuler(STEPS, mu=1.15, flux_sigmas=True).sample(model, y, noise=noise)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference_loop("flux", model, noise, y)[1])


def test_learned_sigma_channels_are_dropped_and_noise_hooks_work():
    y = torch.tensor([0, 5])
    sampler = FlowMatchEuler(6, shift=3.0)
    plain = sampler.sample(Velocity(), y, seed=2)
    assert torch.equal(sampler.sample(Velocity(learned_sigma=True), y, seed=2), plain)
    traj = sampler.sample(Velocity(), y, seed=2, record=True)
    assert torch.equal(traj.steps[0].x_t, sample_noise(2, 2, (2, 4, 4)))  # the documented noise stream
    seen = []
    hooked = sampler.sample(Velocity(), y, seed=2,
                            callback=lambda step, t, x: seen.append((step, t)) or (x * 0 if step == 5 else None))
    assert seen == list(enumerate(sampler.timesteps)) and torch.equal(hooked, torch.zeros_like(plain))
    second = sampler.sample(Velocity(), y[1:], seed=2, sample_offset=1)
    torch.testing.assert_close(second, plain[1:])


@pytest.mark.parametrize("kwargs", [dict(steps=10, cfg_scale=2.5, shift=3.0),
                                    dict(steps=28, mu=1.15, flux_sigmas=True), dict(steps=4, base_timesteps=500)])
def test_spec_round_trip_and_edits_refused(kwargs):
    sampler = FlowMatchEuler(**kwargs)
    spec = json.loads(json.dumps(sampler.spec()))
    assert SAMPLERS["flow-euler"] is FlowMatchEuler
    rebuilt = sampler_from_spec(spec)
    assert type(rebuilt) is FlowMatchEuler and rebuilt.spec() == sampler.spec()
    assert torch.equal(rebuilt.sigmas, sampler.sigmas)
    for key, value in [("timesteps", spec["timesteps"][:-1] + [spec["timesteps"][-1] + 0.5]),
                       ("flux_sigmas", not spec["flux_sigmas"]), ("steps", spec["steps"] + 1)]:
        with pytest.raises(ValueError, match="edited"):
            sampler_from_spec({**spec, key: value})


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps must be"), (dict(shift=0), "shift must be"),
    (dict(shift=float("nan")), "shift must be a finite"), (dict(mu=1.15, shift=3.0), "exclude each other"),
    (dict(mu=float("inf")), "mu must be a finite"), (dict(mu=1000.0), "no finite sigma"),
])
def test_bad_options_raise_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        FlowMatchEuler(**kwargs)
    assert "\n" not in str(err.value)
