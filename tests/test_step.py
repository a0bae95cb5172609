"""The ground-floor step module and the step specs: one table, one state, one decide, one rescale."""
import pytest
import torch

import qc_compiler as qc
from qc_compiler.specs import CacheSchedule, VCTable, rescale
from qc_compiler.step import StepAware, StepState, StepTable, bind_step_state
from conftest import make_tiny


def test_step_table_maps_timesteps_to_call_order():
    table = StepTable(qc.DDPM(steps=4).timesteps, name="ddpm")
    assert table.timesteps == [999, 666, 333, 0]
    assert [table.index(t) for t in (999, 666, 333, 0)] == [0, 1, 2, 3]  # 0 is the first call
    assert table.index(torch.tensor(333).item()) == 2
    with pytest.raises(qc.StepError, match="timestep 500 is not in the compiled schedule"):
        table.index(500)
    with pytest.raises(qc.StepError, match="not in the compiled schedule"):
        table.index(333.5)  # never rounded to a neighbour
    with pytest.raises(ValueError, match="distinct"):
        StepTable([5, 5])


def test_state_enter_resets_at_step_0_and_calibrating_restores():
    state = StepState(num_steps=3)
    state.store("cache")["x"] = 1
    state.enter(1)
    assert state.store("cache") == {"x": 1}
    run = state.run
    state.enter(0)
    assert state.run == run + 1 and state.store("cache") == {}
    with pytest.raises(RuntimeError):
        with state.calibrating(2):
            assert state.step == 2 and state.fresh
            raise RuntimeError
    assert state.step == 0 and not state.fresh


def test_samplers_call_with_step_0_first_and_hooks_see_the_same_index():
    sampler = qc.DDPM(steps=5)
    cm = qc.compile(make_tiny(), passes=[qc.passes.StepCache(interval=1)], sampler=sampler)  # it reads the step
    seen = []

    class Spy(StepAware, torch.nn.Module):
        def forward(self, x):
            seen.append(self.step_state.step)
            return x

    spy = Spy()
    bind_step_state(spy, cm.step_state)
    def pre_hook(module, args):
        spy(args[0])  # returns None: the inputs stay as they are

    cm.graph_module.register_forward_pre_hook(pre_hook)
    hooked = []
    traj = sampler.sample(cm, [1], seed=0, record=True, callback=lambda step, t, x: hooked.append((step, t)))
    assert seen == [0, 1, 2, 3, 4] and [s for s, _ in hooked] == seen
    assert [r.step for r in traj.steps] == seen and [t for _, t in hooked] == sampler.timesteps


def test_cache_schedule_decides_for_torch_and_onnxruntime_alike():
    interval = CacheSchedule("interval", ("a", "b"), interval=3)
    assert [interval.decide(s, 1, True, {}) for s in range(7)] == [True, False, False, True, False, False, True]
    assert interval.decide(2, 0, have=False, memory={})  # nothing stored yet: compute
    static = CacheSchedule("static", ("a", "b"), table=[[1, 1], [0, 1]])
    assert [static.decide(1, r, True, {}) for r in (0, 1)] == [False, True]
    with pytest.raises(qc.StepError, match="past it"):
        static.decide(2, 0, True, {})
    with pytest.raises(ValueError, match="2 entries"):
        CacheSchedule("static", ("a", "b"), table=[[1]])
    assert CacheSchedule.from_json(static.to_json()) == static


def test_rescale_is_the_one_vc_formula_on_non_zero_mean_data():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4) + torch.tensor([5.0, -2.0]).view(1, 2, 1, 1)
    k = torch.tensor([0.5, 2.0])
    mu = x.mean(dim=(2, 3), keepdim=True)
    expected = torch.stack([mu[:, c] + k[c] * (x[:, c] - mu[:, c]) for c in range(2)], dim=1)  # per channel, by hand
    torch.testing.assert_close(rescale(x, k), expected)
    torch.testing.assert_close(rescale(x, k).mean(dim=(2, 3)), x.mean(dim=(2, 3)))  # the mean does not move
    table = VCTable("eps", torch.stack([torch.ones(1), torch.full((1,), 2.0)]))  # 2 steps x 1 channel
    out = table.apply(x, 1)
    torch.testing.assert_close(out[:, :1], rescale(x[:, :1], torch.tensor([2.0])))
    assert torch.equal(out[:, 1:], x[:, 1:])  # sigma channels untouched
