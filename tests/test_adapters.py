"""Model adapters: a new family is one adapter and nothing else; unknown classes get a clear error."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qc_compiler as qc
from qc_compiler.backends.onnx import OrtDenoiser
from qc_compiler.backends.torch_int8 import Int8Linear, WeightOnlyLinear
from qc_compiler.calibration import TAPConfig
from qc_compiler.graph import BlockLayout, BranchSpec
from qc_compiler.models import ModelAdapter, ModelInfo, register_adapter
from qc_compiler.passes.cache import CacheLookup
from qc_compiler.presets import qandc
from qc_compiler.specs import StepCacheConfig, VCConfig
from conftest import make_tiny


# --- a toy family, defined here and nowhere else --------------------------------------------------
class ToyBlock(nn.Module):
    """Two residual branches with their own names: a tanh token mixer and a GELU feed-forward."""

    def __init__(self, d: int):
        super().__init__()
        self.mod = nn.Linear(d, 4 * d)  # conditioning -> shift/scale of both branches
        self.pre_mix, self.pre_ff = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm(d, elementwise_affine=False)
        self.mix, self.mix_out = nn.Linear(d, d), nn.Linear(d, d)
        self.ff_in, self.ff_out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, c):
        s1, b1, s2, b2 = self.mod(F.silu(c)).chunk(4, dim=-1)  # (N, D) each
        h = h + self.mix_out(torch.tanh(self.mix(self.pre_mix(h) * (1 + s1[:, None]) + b1[:, None])))
        return h + self.ff_out(F.gelu(self.ff_in(self.pre_ff(h) * (1 + s2[:, None]) + b2[:, None]), approximate="tanh"))


class ToyDiT(nn.Module):
    """Pixels as tokens; attributes named unlike DiT's, so only the adapter can describe it."""

    def __init__(self, size: int = 6, channels: int = 1, classes: int = 4, width: int = 32, depth: int = 2):
        super().__init__()
        self.size, self.channels, self.classes = size, channels, classes
        self.proj_in, self.proj_out = nn.Linear(channels, width), nn.Linear(width, channels)
        self.t_table, self.y_table = nn.Embedding(1000, width), nn.Embedding(classes + 1, width)  # + the null class
        self.layers = nn.ModuleList([ToyBlock(width) for _ in range(depth)])

    def forward(self, x, t, y):
        h = self.proj_in(x.flatten(2).transpose(1, 2))  # (N, T, D)
        c = self.t_table(t) + self.y_table(y)  # (N, D)
        for layer in self.layers:
            h = layer(h, c)
        return self.proj_out(h).transpose(1, 2).reshape(-1, self.channels, self.size, self.size)


class ToyAdapter(ModelAdapter):
    def info(self, model):
        return ModelInfo(input_size=model.size, in_channels=model.channels, out_channels=model.channels,
                         num_classes=model.classes)

    def config(self, model):
        return {"size": model.size, "channels": model.channels, "classes": model.classes,
                "width": model.proj_in.out_features, "depth": len(model.layers)}

    def build(self, config):
        return ToyDiT(**config)


TOY = register_adapter(ToyAdapter(
    name="toy", classes=("ToyDiT",),
    blocks=BlockLayout(r"^layers\.\d+$", (BranchSpec("mix", "pre_mix", "mix_out"), BranchSpec("ff", "pre_ff", "ff_out"))),
    quantizable=("layers.*",), conditioning_linears=("*.mod",), capture_mode="fx",
))


def toy():
    torch.manual_seed(0)
    return ToyDiT().eval()


def test_a_new_family_is_one_adapter_compiled_with_qandc_to_int8_and_onnx(tmp_path):
    model, sampler = toy(), qc.DDPM(steps=6, cfg_scale=1.5)
    assert qc.adapter_for(model) is TOY
    passes = lambda: qandc(bits="w8a8", cache=StepCacheConfig(interval=2), tap=TAPConfig(clusters=4), size=16,  # noqa: E731
                           pool_labels=4, vc=VCConfig(batch=4))
    cm = qc.compile(model, passes=passes(), sampler=sampler, backend="torch")
    modules = list(cm.graph_module.modules())
    assert sum(isinstance(m, CacheLookup) for m in modules) == 4  # mix and ff of both layers
    assert sum(isinstance(m, Int8Linear) for m in modules) == 8  # mix, mix_out, ff_in, ff_out x 2
    assert sum(isinstance(m, WeightOnlyLinear) for m in modules) == 2  # the conditioning linears
    ref = sampler.sample(model, [0, 1, 2, 3], seed=0, shape=(1, 6, 6), null_label=4)
    out = sampler.sample(cm, [0, 1, 2, 3], seed=0)
    assert 0.01 < float((out - ref).norm() / ref.norm()) < 0.1  # measured 0.053: quantized and cached, same samples
    fake = qc.compile(model, passes=passes(), sampler=sampler, backend="fakequant")
    ort = OrtDenoiser(cm.export_onnx(tmp_path / "toy.onnx"), threads=1)
    a, b = sampler.sample(fake, [0, 1, 2, 3], seed=0), sampler.sample(ort, [0, 1, 2, 3], seed=0)
    assert float((a - b).norm() / a.norm()) < 1e-4
    cm.save(tmp_path / "toy")
    again = qc.load_compiled(tmp_path / "toy")
    assert torch.equal(sampler.sample(again, [1, 2], seed=3), sampler.sample(cm, [1, 2], seed=3))


def test_an_unknown_class_names_the_known_ones_and_how_to_register():
    class Mystery(nn.Module):
        def forward(self, x, t, y):
            return x

    with pytest.raises(qc.QCError) as info:
        qc.compile(Mystery(), passes=[])
    msg = str(info.value)
    assert "no model adapter knows Mystery" in msg and "DiT" in msg and "register_adapter" in msg


def test_the_adapter_is_the_one_place_inputs_and_info_come_from():
    model = make_tiny()
    adapter = qc.adapter_for(model)
    info = adapter.info(model)
    assert (info.input_size, info.in_channels, info.out_channels, info.num_classes) == (16, 1, 2, 10)
    assert info.learn_sigma and info.null_label == 10 and adapter.null_condition(info) == 10
    x, t, y = adapter.example_inputs(info, batch=3)
    assert x.shape == (3, 1, 16, 16) and t.shape == y.shape == (3,)
    assert ModelInfo.from_json(info.to_json()) == info
    with pytest.raises(ValueError, match="input_size must be an integer"):
        ModelInfo(input_size=16.0, in_channels=1, out_channels=1)
    cm = qc.compile(model, sampler=qc.DDPM(steps=2))
    assert cm.info == info and cm.num_classes == 10 and cm.sample_shape == (1, 16, 16)
