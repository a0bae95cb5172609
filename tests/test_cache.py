import pytest
import torch

import qc_compiler as qc
from qc_compiler.passes import StepCache, StepCacheConfig
from qc_compiler.passes.cache import CacheLookup
from conftest import make_tiny


def lookups(cm):
    return [m for m in cm.graph_module.modules() if isinstance(m, CacheLookup)]


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_interval_1_is_bit_identical_to_no_cache(mode):
    model, sampler = make_tiny(), qc.DDPM(steps=6, cfg_scale=1.5)
    cm = qc.compile(model, passes=[StepCache(interval=1)], sampler=sampler, capture_mode=mode)
    assert len(lookups(cm)) == 4
    assert torch.equal(sampler.sample(cm, [1, 2, 3], seed=0), sampler.sample(model, [1, 2, 3], seed=0))


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_reuse_step_returns_stored_tensor_without_calling_region(mode):
    sampler = qc.DDPM(steps=6)
    cm = qc.compile(make_tiny(), passes=[StepCache(interval=3)], sampler=sampler, capture_mode=mode)
    calls, returned = {}, {}
    for lk in lookups(cm):
        lk.region.register_forward_hook(lambda m, a, o, k=lk.key: calls.setdefault(k, []).append(cm.step_state.step))
        lk.register_forward_hook(lambda m, a, o, k=lk.key: returned.setdefault(k, []).append(o))
    sampler.sample(cm, [4, 5], seed=0)
    for key, steps in calls.items():
        assert steps == [0, 3]  # computed only at step % 3 == 0
        outs = returned[key]
        assert outs[1] is outs[0] and outs[2] is outs[0]  # steps 1, 2 return exactly the stored tensor
        assert outs[4] is outs[3] and outs[3] is not outs[0]


def test_schedule_in_report_matches_interval_policy():
    sampler = qc.DDPM(steps=7)
    cm = qc.compile(make_tiny(), passes=[StepCache(interval=3)], sampler=sampler)
    sampler.sample(cm, [0], seed=0)
    report = cm.report()
    for step in range(7):
        assert f"step {step:>3}: {'CCCC' if step % 3 == 0 else '....'}" in report
    assert "block FLOPs skipped:" in report
    # 4 of 7 steps reuse both branches; skipped share = 4/7 of branch FLOPs over block FLOPs (adaLN stays)
    schedule = cm.graph_module.meta["qc.cache"]
    expected = 4 * sum(schedule.region_flops) / (7 * schedule.block_flops)
    assert f"{expected:.1%}" in report
    from qc_compiler.passes.cache import skipped_flops_fraction

    assert skipped_flops_fraction(cm) == pytest.approx(expected)
    assert skipped_flops_fraction(qc.compile(make_tiny(), sampler=sampler)) == 0.0


def test_runs_reset_and_first_step_always_computes():
    sampler = qc.DDPM(steps=4)
    cm = qc.compile(make_tiny(), passes=[StepCache(interval=100)], sampler=sampler)
    a = sampler.sample(cm, [1], seed=0)
    run = cm.step_state.run
    b = sampler.sample(cm, [1], seed=0)
    assert cm.step_state.run == run + 1 and torch.equal(a, b)  # nothing leaked from run 1 into run 2
    assert cm.step_state.store("cache")["computed"] == {0: {0, 1, 2, 3}}


def test_batch_and_label_changes_inside_a_run_are_errors():
    sampler = qc.DDPM(steps=4, cfg_scale=2.0)
    cm = qc.compile(make_tiny(), passes=[StepCache(interval=2)], sampler=sampler)
    sampler.sample(cm, [1, 2], seed=0)  # a CFG batch of 4 works
    x = torch.randn(2, 1, 16, 16)
    cm(x, torch.tensor([999, 999]), torch.tensor([1, 2]))
    with pytest.raises(qc.StepError, match="changed inside a sampling run"):
        cm(x, torch.tensor([666, 666]), torch.tensor([1, 3]))
    cm(x, torch.tensor([999, 999]), torch.tensor([1, 2]))
    with pytest.raises(qc.StepError, match="changed inside a sampling run"):
        cm(torch.randn(3, 1, 16, 16), torch.tensor([666] * 3), torch.tensor([1, 2, 3]))


def computed_count(cm):
    return sum(len(v) for v in cm.step_state.store("cache")["computed"].values())


def test_adaptive_policy_computes_more_when_threshold_is_lower():
    sampler = qc.DDPM(steps=10)
    counts = []
    for threshold in (0.01, 0.5, 5.0):
        cm = qc.compile(make_tiny(), passes=[StepCache(policy="adaptive", threshold=threshold)], sampler=sampler)
        sampler.sample(cm, [3, 4], seed=0)
        counts.append(computed_count(cm))
    assert counts[0] > counts[1] > counts[2]
    assert counts[0] == 40 and counts[2] == 4 + 9  # everything / only step 0 and the probe region


def test_first_block_policy_runs_the_first_block_and_compares_with_the_last_full_step():
    sampler = qc.DDPM(steps=10)
    counts = {}
    for threshold in (0.0, 1e9):
        cm = qc.compile(make_tiny(), passes=[StepCache(policy="first_block", threshold=threshold)], sampler=sampler)
        sampler.sample(cm, [3, 4], seed=0)
        counts[threshold] = computed_count(cm)
        computed = cm.step_state.store("cache")["computed"]
        # 2 blocks x (attn, mlp): both regions of block 0 run at every step
        assert all({0, 1} <= computed[s] for s in range(10))
    assert counts[0.0] == 40  # any change recomputes everything
    assert counts[1e9] == 4 + 2 * 9  # nothing changes enough: only the first block after step 0
    schedule = cm.graph_module.meta["qc.cache"]
    assert schedule.first_block == 2 and type(schedule).from_json(schedule.to_json()) == schedule
    with pytest.raises(qc.ExportError, match="first_block"):
        qc.compile(make_tiny(), passes=[StepCache(policy="first_block")], sampler=sampler, backend="onnx")


def test_static_schedule_given_and_validated():
    sampler = qc.DDPM(steps=3)
    schedule = [[1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0]]
    cm = qc.compile(make_tiny(), passes=[StepCache(policy="static", schedule=schedule)], sampler=sampler)
    sampler.sample(cm, [1], seed=0)
    assert cm.step_state.store("cache")["computed"] == {0: {0, 1, 2, 3}, 1: {1, 3}, 2: {0}}
    with pytest.raises(qc.PassError, match="3 steps x 4 regions"):
        qc.compile(make_tiny(), passes=[StepCache(policy="static", schedule=[[1, 1]])], sampler=sampler)


def test_derived_static_schedule_is_saved_and_restored(tmp_path, monkeypatch):
    sampler = qc.DDPM(steps=8)
    cm = qc.compile(make_tiny(), passes=[StepCache(policy="static", threshold=0.5)], sampler=sampler)
    schedule = cm.build["fitted"]["cache.schedule"]
    assert schedule[0] == [1, 1, 1, 1] and any(0 in row for row in schedule)
    cm.save(tmp_path / "m")
    from qc_compiler.pipeline import PassContext

    def no_collect(*a, **k):
        raise AssertionError("a loaded model must not calibrate again")

    monkeypatch.setattr(PassContext, "collect", no_collect)
    loaded = qc.load_compiled(tmp_path / "m")
    assert torch.equal(sampler.sample(loaded, [2], seed=0), sampler.sample(cm, [2], seed=0))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="policy"):
        StepCache(policy="sometimes")
    with pytest.raises(ValueError, match="interval"):
        StepCache(interval=0)
    for bad in (2.7, True, "2"):  # typed, never coerced
        with pytest.raises(ValueError, match="interval must be an integer"):
            StepCache(interval=bad)
    with pytest.raises(ValueError, match="finite"):
        StepCache(policy="adaptive", threshold=float("nan"))
    with pytest.raises(ValueError, match="not of 'adaptive'"):  # conflicting options raise
        StepCache(policy="adaptive", interval=3)
    with pytest.raises(ValueError, match="schedule is an option of the static policy"):
        StepCache(schedule=[[1]])
    with pytest.raises(ValueError, match="not both"):
        StepCache(StepCacheConfig(interval=2), interval=3)
    with pytest.raises(ValueError, match="unexpected keyword"):
        StepCache(intervl=3)
    assert StepCache(StepCacheConfig(interval=3)).options() == StepCache(interval=3).options()
