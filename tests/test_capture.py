import pytest
import torch
import torch.nn as nn

from qc_compiler.capture import capture
from qc_compiler.errors import CaptureError
from qc_compiler.graph import find_linears, graph_flavour, node_module_path
from qc_compiler.graph import find_branch_regions as _find_branch_regions
from qc_compiler.models.adapters.dit import DIT
from conftest import make_tiny


def find_branch_regions(gm):
    return _find_branch_regions(gm, DIT.blocks)


def take(model, prefer):
    """Capture as qc.compile does: the adapter builds the example inputs torch.export needs."""
    return capture(model, example_inputs=DIT.example_inputs(DIT.info(model)), prefer=prefer)


@pytest.mark.parametrize("prefer", ["fx", "export"])
@pytest.mark.parametrize("fused", [True, False])
def test_graph_matches_model_bit_for_bit(prefer, fused):
    model = make_tiny(fused_attn=fused)
    gm = take(model, prefer)
    assert graph_flavour(gm) == prefer
    for batch in (1, 3, 8):  # dynamic batch under export too
        x, t, y = torch.randn(batch, 1, 16, 16), torch.full((batch,), 321.0), torch.arange(batch) % 11  # the adapter captures float t
        assert torch.equal(gm(x, t, y), model(x, t, y))


@pytest.mark.parametrize("prefer", ["fx", "export"])
def test_linears_and_branch_regions_in_both_flavours(prefer):
    gm = take(make_tiny(), prefer)
    paths = [s.path for s in find_linears(gm)]
    # 2 timestep-MLP linears, per block adaLN + qkv + proj + fc1 + fc2, final adaLN + final linear.
    assert len(paths) == 2 + 2 * 5 + 2
    assert "blocks.1.attn.qkv" in paths and "final_layer.linear" in paths
    site = next(s for s in find_linears(gm) if s.path == "blocks.0.mlp.fc1")
    assert site.weight.shape == (256, 64)
    regions = find_branch_regions(gm)
    assert [r.qualname for r in regions] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    for r in regions:
        assert node_module_path(r.entry).endswith("norm1" if r.name == "attn" else "norm2")
        assert node_module_path(r.exit).endswith("attn.proj" if r.name == "attn" else "mlp.fc2")
        inside = {node_module_path(n) for n in r.nodes}
        assert not any("adaLN" in p for p in inside)  # modulation is recomputed, not part of the branch
        # the block input and the adaLN shift/scale come from outside
        assert len([n for n in r.inputs() if n.op != "get_attr"]) >= 3


def test_capture_copies_the_model():
    model = make_tiny()
    gm = capture(model)
    with torch.no_grad():
        gm.get_submodule("blocks.0.attn.qkv").weight.zero_()
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither tracer can capture it
            return x
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = nn.Sequential(nn.Linear(3, 3), Branchy())

    def forward(self, x):
        return self.stage(x)


def test_capture_error_names_module_and_line():
    with pytest.raises(CaptureError) as info:
        capture(Outer(), example_inputs=(torch.randn(2, 3),))
    msg = str(info.value)
    assert "'stage.1'" in msg and "Branchy" in msg
    assert "test_capture.py:" in msg and "if x.sum() > 0" in msg
    assert "Fix:" in msg and "torch.export also failed" in msg


def test_leaf_module_makes_it_traceable():
    model = Outer()
    gm = capture(model, leaf_modules=[Branchy])
    x = torch.randn(2, 3)
    assert torch.equal(gm(x), model(x))
    assert any(n.op == "call_module" and n.target == "stage.1" for n in gm.graph.nodes)


def test_export_without_example_inputs_says_what_to_pass():
    with pytest.raises(CaptureError, match="pass example_inputs"):
        capture(make_tiny(), prefer="export")
