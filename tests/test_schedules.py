"""One compiled model for several step tables: each run served by its own table (calibration and VC
fitted per table), weights shared, clear errors, and one artefact on disk."""
import json

import pytest
import torch
from conftest import make_tiny

import qc_compiler as qc
from qc_compiler.backends.torch_int8 import Int8Linear
from qc_compiler.passes import Quantize, StepCache, UniformCalibration, VarianceCompensation
from qc_compiler.passes.vc import VCSampleHook
from qc_compiler.quant import QuantConfig

LABELS = [1, 2, 3]


def passes():
    # every step-dependent part: per-step-group ranges, an interval cache, VC's per-step table
    return [StepCache(interval=2), UniformCalibration(size=16, pool_labels=4, num_steps=4),
            Quantize(config=QuantConfig(act_step_groups=2)), VarianceCompensation(placement="sample", batch=8)]


@pytest.fixture(scope="module")
def compiled():
    model, samplers = make_tiny(), [qc.DDIM(steps=5), qc.DDIM(steps=8)]
    multi = qc.compile(model, passes(), sampler=samplers)
    singles = [qc.compile(model, passes(), sampler=s) for s in samplers]
    return multi, singles, samplers


def test_each_run_is_served_by_its_own_table(compiled):
    multi, singles, samplers = compiled
    assert isinstance(multi, qc.CompiledSchedules) and [len(t) for t in multi.tables] == [5, 8]
    # in any order, a run on either table equals the model compiled for that table alone
    for i in (0, 1, 0):
        got = samplers[i].sample(multi, LABELS, seed=1)
        assert torch.equal(got, samplers[i].sample(singles[i], LABELS, seed=1)), f"table {i}"
        assert multi.current is multi.variants[i]
    # fitted per table: VC's table has a row per step, and the tables' activation ranges differ
    hooks = [[h for h in v.step_hooks if isinstance(h, VCSampleHook)][0] for v in multi.variants]
    assert [h.k.shape[0] for h in hooks] == [5, 8]
    layers = [[m for m in v.modules() if isinstance(m, Int8Linear)] for v in multi.variants]
    assert layers[0] and any(a.spec.act != b.spec.act for a, b in zip(*layers))
    # ... while the int8 weights are one tensor for both tables
    assert all(a.w_int8 is b.w_int8 and a.spec.codes is b.spec.codes for a, b in zip(*layers))


def test_a_timestep_outside_every_table_or_a_shared_start_is_refused_with_the_way_out(compiled):
    multi, singles, samplers = compiled
    x, y = torch.randn(1, 1, 16, 16), torch.tensor([1])
    multi.reset()
    with pytest.raises(qc.StepError, match=r"starts 2 compiled schedules .*select"):
        multi(x, torch.tensor([999]), y)  # both tables start at 999: the caller must say which
    with pytest.raises(qc.StepError, match=r"does not start a run .*5 steps.*8 steps"):
        multi(x, torch.tensor([500]), y)
    with pytest.raises(qc.StepError, match=r"6 steps.* not one this model was compiled for .*sampler=\[\.\.\.\]"):
        qc.DDIM(steps=6).sample(multi, LABELS, seed=0)  # refused before any step runs
    assert multi.select(8) is multi.variants[1]
    multi(x, torch.tensor([999]), y)
    assert multi.current.step_state.step == 0 and multi.current is multi.variants[1]
    multi.select(None)
    with pytest.raises(qc.ExportError, match=r"select\(5\)\.export_onnx"):
        multi.export_onnx("never.onnx")


def test_a_single_table_model_refuses_another_schedule_before_the_first_step(compiled):
    _, singles, _ = compiled
    singles[0].reset()
    with pytest.raises(qc.StepError, match="compiled for ddim with 5 steps"):
        qc.DDIM(steps=8).sample(singles[0], LABELS, seed=0)
    assert singles[0].step_state.step == -1  # nothing ran
    # a model no pass makes step-dependent serves every schedule: one model, returned as is
    plain = qc.compile(make_tiny(), [], sampler=[qc.DDIM(steps=5), qc.DDIM(steps=8)])
    assert isinstance(plain, qc.CompiledModel) and plain.uses_steps is False
    assert qc.DDIM(steps=8).sample(plain, LABELS, seed=0).shape == (3, 1, 16, 16)


def test_save_and_load_one_artefact_with_every_table(compiled, tmp_path):
    multi, _, samplers = compiled
    multi.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert [s["sampler"]["steps"] for s in manifest["schedules"]] == [5, 8]
    loaded = qc.load_compiled(tmp_path / "m")
    assert isinstance(loaded, qc.CompiledSchedules)
    for s in samplers:
        assert torch.equal(s.sample(loaded, LABELS, seed=2), s.sample(multi, LABELS, seed=2))
    text = (tmp_path / "m" / "manifest.json").read_text()
    (tmp_path / "m" / "manifest.json").write_text(text.replace('"steps": 8', '"steps": 9', 1))
    with pytest.raises(qc.ArtifactError, match="digest"):
        qc.load_compiled(tmp_path / "m")


def test_bad_schedule_lists_are_refused_before_work():
    with pytest.raises(ValueError, match="repeats an earlier sampler"):
        qc.compile(make_tiny(), passes(), sampler=[qc.DDIM(steps=5), qc.DDIM(steps=5)])
    with pytest.raises(TypeError, match="list of 2 dicts"):
        qc.compile(make_tiny(), passes(), sampler=[qc.DDIM(steps=5), qc.DDIM(steps=8)], fitted={})
    with pytest.raises(TypeError, match="qc sampler"):
        qc.compile(make_tiny(), passes(), sampler=[qc.DDIM(steps=5), "ddim"])


def test_tables_with_their_own_first_timestep_need_no_announcement():
    early = qc.DDIM(steps=4, base_timesteps=800)  # starts at 799, the other table at 999
    multi = qc.compile(make_tiny(), [StepCache(interval=2)], sampler=[qc.DDIM(steps=5), early])
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    for table, variant in ((early, 1), (qc.DDIM(steps=5), 0)):  # a raw loop, as a pipeline calls it
        for t in table.timesteps:
            multi(x, torch.tensor([t]), y)
            assert multi.current is multi.variants[variant]
        assert multi.current.step_state.step == len(table.timesteps) - 1


def test_a_pipeline_stream_reaches_every_table(compiled):
    multi = compiled[0]
    with multi.stream("uncond"):  # set before the call that picks the table, so every table must see it
        assert [v.step_state.stream for v in multi.variants] == ["uncond", "uncond"]
    assert [v.step_state.stream for v in multi.variants] == ["", ""]
