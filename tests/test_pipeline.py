import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import qc_compiler as qc
from qc_compiler.pipeline import Pass, PassContext, PassManager, PassResult, graph_pass
from conftest import make_tiny


class Recorder(Pass):
    """A pass that records that it ran, with configurable requires/provides."""

    def __init__(self, name, requires=(), provides=(), log=None):
        self.name, self.requires, self.provides, self.log = name, frozenset(requires), frozenset(provides), log

    def run(self, gm, ctx):
        self.log.append(self.name)
        for key in self.provides:
            ctx.artifacts[key] = True
        return PassResult(gm, modified=False)


def test_bad_order_is_refused_before_any_pass_runs():
    log = []
    passes = [Recorder("first", log=log), Recorder("quantize", requires={"calibration_set"}, log=log),
              Recorder("select", provides={"calibration_set"}, log=log)]
    with pytest.raises(qc.PassOrderError) as info:
        qc.compile(make_tiny(), passes=passes, sampler=qc.DDPM(steps=2))
    msg = str(info.value)
    assert "'quantize'" in msg and "calibration_set" in msg and "['select']" in msg
    assert log == []  # nothing ran


def test_good_order_runs_in_order_and_reports():
    log = []
    passes = [Recorder("select", provides={"calibration_set"}, log=log),
              Recorder("quantize", requires={"calibration_set"}, log=log)]
    cm = qc.compile(make_tiny(), passes=passes, sampler=qc.DDPM(steps=2))
    assert log == ["select", "quantize"]
    assert [r.name for r in cm.records] == ["select", "quantize"]
    assert all(r.nodes_before == r.nodes_after > 10 for r in cm.records)
    assert "select" in cm.report() and "quantize" in cm.report()


def test_duplicate_pass_names_and_non_passes_are_rejected():
    with pytest.raises(qc.PassOrderError, match="more than once"):
        PassManager([Recorder("a", log=[]), Recorder("a", log=[])])
    with pytest.raises(TypeError, match="is not a pass"):
        PassManager([object()])


def test_pass_that_breaks_the_graph_is_caught_by_lint():
    @graph_pass(name="breaker")
    def breaker(gm, ctx):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        first = next(iter(gm.graph.nodes))
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch.relu, (output.args[0],))  # uses a value before it is defined
        return gm

    with pytest.raises(qc.PassError, match="breaker.*invalid graph"):
        qc.compile(make_tiny(), passes=[breaker], sampler=qc.DDPM(steps=2))


def test_pass_that_forgets_what_it_provides_is_an_error():
    @graph_pass(name="liar", provides={"calibration_set"})
    def liar(gm, ctx):
        return gm

    with pytest.raises(qc.PassError, match="did not set"):
        qc.compile(make_tiny(), passes=[liar], sampler=qc.DDPM(steps=2))


# The worked example from the README: swap tanh-GELU for exact GELU.
@graph_pass(name="exact_gelu")
def exact_gelu(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.GELU):
            gm.get_submodule(node.target).approximate = "none"
            ctx.notes["exact_gelu"] = ctx.notes.get("exact_gelu", "") + f"{node.target} "
    return gm


def test_custom_pass_changes_the_compiled_model_only():
    model = make_tiny()
    cm = qc.compile(model, passes=[exact_gelu], sampler=qc.DDPM(steps=2))
    gelus = [m for m in cm.graph_module.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 2 and all(m.approximate == "none" for m in gelus)
    assert all(m.approximate == "tanh" for m in model.modules() if isinstance(m, nn.GELU))  # user model untouched
    x, t, y = torch.randn(2, 1, 16, 16), torch.full((2,), 999), torch.tensor([1, 2])
    out, ref = cm(x, t, y), model(x, t, y)
    assert not torch.equal(out, ref) and torch.allclose(out, ref, atol=1e-2)


def test_context_fit_reuses_restored_state():
    calls = []
    ctx = PassContext(fitted={"restored": 1})
    assert ctx.fit("restored", lambda: calls.append(1)) == 1 and calls == []
    assert ctx.fit("new", lambda: 5) == 5 and ctx.fitted["new"] == 5


def test_collect_runs_sampler_over_current_graph():
    model = make_tiny()
    gm = qc.capture(model)
    adapter = qc.adapter_for(model)
    ctx = PassContext(adapter=adapter, info=adapter.info(model), sampler=qc.DDPM(steps=3, cfg_scale=1.5), seed=4)
    traj = ctx.collect(gm, labels=[1, 2])
    assert len(traj.steps) == 3
    assert torch.equal(traj.samples, qc.DDPM(steps=3, cfg_scale=1.5).sample(model, [1, 2], seed=4))
