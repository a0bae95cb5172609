import pytest
import torch
import torch.nn as nn

import qc_compiler as qc
from qc_compiler.pipeline import PassResult, register_pass, Pass
from qc_compiler.step import StepAware
from conftest import make_tiny


def test_compile_without_passes_samples_bit_identical():
    model = make_tiny()
    sampler = qc.DDPM(steps=8, cfg_scale=1.5)
    cm = qc.compile(model, passes=[], sampler=sampler)
    assert torch.equal(sampler.sample(cm, [0, 3, 9], seed=1), sampler.sample(model, [0, 3, 9], seed=1))


def test_step_mapping_and_unknown_timestep():
    from qc_compiler.passes import StepCache

    free = qc.compile(make_tiny(), sampler=qc.DDPM(steps=4))  # nothing reads the step: any schedule
    assert not free.uses_steps and free(torch.randn(2, 1, 16, 16), torch.tensor([500, 500]), torch.tensor([1, 2])).shape
    cm = qc.compile(make_tiny(), passes=[StepCache(interval=1)], sampler=qc.DDPM(steps=4))
    assert cm.uses_steps and cm.timesteps == [999, 666, 333, 0]
    assert [cm.step_of(t) for t in (999, 666, 333, 0)] == [0, 1, 2, 3]
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    with pytest.raises(qc.StepError, match="timestep 500 is not in the compiled schedule"):
        cm(x, torch.tensor([500, 500]), y)
    with pytest.raises(qc.StepError, match="one timestep"):
        cm(x, torch.tensor([999, 666]), y)
    assert cm(x, torch.tensor(999), y).shape == (2, 2, 16, 16)  # a scalar t is broadcast


class RunCounter(StepAware, nn.Module):
    """Counts calls per run in the step state's store, to check that runs reset it."""

    def forward(self, x):
        store = self.step_state.store("counter")
        store["calls"] = store.get("calls", 0) + 1
        store.setdefault("steps", []).append(self.step_state.step)
        return x

    def report_section(self):
        return "counter: here"


@register_pass
class InsertCounter(Pass):
    name = "test_insert_counter"

    def run(self, gm, ctx):
        gm.add_submodule("counter", RunCounter())
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = gm.graph.call_module("counter", (out.args[0],))
        out.args = (new,)
        return PassResult(gm, modified=True, notes="1 counter")


def test_first_step_starts_a_new_run():
    sampler = qc.DDPM(steps=3)
    cm = qc.compile(make_tiny(), passes=[InsertCounter()], sampler=sampler)
    sampler.sample(cm, [1], seed=0)
    store = cm.step_state.store("counter")
    assert store["steps"] == [0, 1, 2]
    run = cm.step_state.run
    sampler.sample(cm, [1], seed=1)
    assert cm.step_state.run == run + 1 and cm.step_state.store("counter")["calls"] == 3
    assert "counter: here" in cm.report() and "1 counter" in cm.report()


def test_save_load_round_trip(tmp_path):
    sampler = qc.DDIM(steps=5, cfg_scale=2.0)
    cm = qc.compile(make_tiny(), passes=[InsertCounter()], sampler=sampler, seed=3)
    cm.build["fitted"]["demo.table"] = torch.arange(4.0)
    cm.build["fitted"]["demo.json"] = {"a": 1}
    cm.save(tmp_path / "m")
    loaded = qc.load_compiled(tmp_path / "m")
    assert loaded.sampler_spec == cm.sampler_spec
    assert torch.equal(loaded.build["fitted"]["demo.table"], torch.arange(4.0))
    assert loaded.build["fitted"]["demo.json"] == {"a": 1}
    assert torch.equal(sampler.sample(loaded, [2, 4], seed=0), sampler.sample(cm, [2, 4], seed=0))
    assert isinstance(loaded.graph_module.get_submodule("counter"), RunCounter)
    assert not list(tmp_path.glob("m/*.tmp"))


def test_tampered_and_truncated_files_are_refused(tmp_path):
    cm = qc.compile(make_tiny(), sampler=qc.DDPM(steps=2))
    cm.save(tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(qc.ArtifactError, match="SHA-256"):
        qc.load_compiled(tmp_path / "m")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(qc.ArtifactError, match="truncated or modified"):
        qc.load_compiled(tmp_path / "m")
    manifest = tmp_path / "m" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(qc.ArtifactError, match="not valid JSON"):
        qc.load_compiled(tmp_path / "m")
    with pytest.raises(qc.ArtifactError, match="missing"):
        qc.load_compiled(tmp_path / "nothing")


def test_an_older_artefact_is_refused_with_how_to_recompile(tmp_path):
    import json

    from qc_compiler.persist import write_manifest

    cm = qc.compile(make_tiny(), sampler=qc.DDPM(steps=2))
    cm.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["format_version"] = 1  # what qc-compiler 0.1 wrote
    write_manifest({k: v for k, v in manifest.items() if k != "digest"}, tmp_path / "m")
    with pytest.raises(qc.ArtifactError, match="format version 1; this qc-compiler reads version 2: recompile"):
        qc.load_compiled(tmp_path / "m")


def test_unregistered_pass_cannot_be_saved(tmp_path):
    from qc_compiler.pipeline import graph_pass

    cm = qc.compile(make_tiny(), passes=[graph_pass(name="adhoc")(lambda gm, ctx: gm)], sampler=qc.DDPM(steps=2))
    with pytest.raises(qc.ArtifactError, match="not registered"):
        cm.save(tmp_path / "m")
    assert not (tmp_path / "m" / "manifest.json").exists()
