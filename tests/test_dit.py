import torch

from qc_compiler.models.dit import DiT, DiT_models
from conftest import make_tiny


def official_shapes(depth, hidden, patch, in_channels, num_classes, input_size, learn_sigma=True, mlp_ratio=4.0):
    """The state-dict keys and shapes of facebookresearch/DiT's models.py, written out from its source."""
    out_ch = in_channels * 2 if learn_sigma else in_channels
    mlp = int(hidden * mlp_ratio)
    shapes = {
        "pos_embed": (1, (input_size // patch) ** 2, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp, hidden), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (hidden, mlp), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return shapes


def test_state_dict_matches_official_dit_xl2_layout():
    # DiT-XL/2 at 256 px: latents 4x32x32, 1000 classes. Built on the meta device: no memory, no download.
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, in_channels=4, num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes(28, 1152, 2, 4, 1000, 32)


def test_official_checkpoint_loads_strict_from_local_file(tmp_path):
    shapes = official_shapes(2, 64, 4, 1, 10, 16)
    torch.manual_seed(0)
    ckpt = {k: torch.randn(s) for k, s in shapes.items()}
    path = tmp_path / "DiT-tiny.pt"
    torch.save(ckpt, path)
    model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, ckpt["blocks.1.mlp.fc2.weight"])


def test_forward_shapes_and_learned_sigma(tiny):
    x = torch.randn(3, 1, 16, 16)
    out = tiny(x, torch.tensor([1, 500, 999]), torch.tensor([0, 5, 10]))  # label 10 = the null class
    assert out.shape == (3, 2, 16, 16)
    no_sigma = make_tiny(learn_sigma=False)
    assert no_sigma(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])).shape == (3, 1, 16, 16)


def test_fused_and_explicit_attention_agree():
    a, b = make_tiny(fused_attn=True), make_tiny(fused_attn=False)
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 10]), torch.tensor([1, 2])
    torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=1e-5, atol=1e-5)


def test_forward_with_cfg_combines_halves(tiny):
    x = torch.randn(2, 1, 16, 16)
    xx, t, y = torch.cat([x, x]), torch.full((4,), 100), torch.tensor([3, 7, 10, 10])
    out = tiny.forward_with_cfg(xx, t, y, cfg_scale=4.0)
    raw = tiny(xx, t, y)
    expected = raw[2:, :1] + 4.0 * (raw[:2, :1] - raw[2:, :1])
    torch.testing.assert_close(out[:2, :1], expected)
    torch.testing.assert_close(out[2:, :1], expected)
    torch.testing.assert_close(out[:, 1:], raw[:, 1:])


def test_label_dropout_only_in_training(tiny):
    tiny.y_embedder.dropout_prob = 1.0
    labels = torch.tensor([1, 2, 3])
    assert torch.equal(tiny.y_embedder.token_drop(labels), torch.full((3,), 10))
    emb_eval = tiny.y_embedder(labels, train=False)
    assert torch.equal(emb_eval, tiny.y_embedder.embedding_table(labels))


def test_bad_config_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(input_size=15, patch_size=4)


def test_official_pt_checkpoint_loads_through_load_model(tmp_path):
    import qc_compiler as qc

    shapes = official_shapes(3, 384, 4, 4, 1000, 32)  # a DiT-S/4-like layout, depth 3
    torch.manual_seed(0)
    ckpt = {k: torch.randn(s) * 0.02 for k, s in shapes.items()}
    torch.save(ckpt, tmp_path / "DiT-S-4.pt")
    model = qc.load_model(str(tmp_path / "DiT-S-4.pt"))
    assert (model.num_heads, len(model.blocks), model.patch_size, model.input_size) == (6, 3, 4, 32)
    assert torch.equal(model.pos_embed, ckpt["pos_embed"])
    torch.save({"ema": ckpt, "opt": {}, "model": ckpt}, tmp_path / "train.pt")  # a training checkpoint
    assert torch.equal(qc.load_model(str(tmp_path / "train.pt")).blocks[2].mlp.fc1.weight, ckpt["blocks.2.mlp.fc1.weight"])


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    import pytest

    import qc_compiler as qc

    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(qc.ArtifactError, match="pickled code"):
        qc.load_model(str(tmp_path / "evil.pt"))
