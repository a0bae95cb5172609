import pytest
import torch

from qc_compiler.models.dit import DiT_models


def make_tiny(seed: int = 0, fused_attn: bool = True, **kwargs):
    """A 2-block DiT on 1x16x16 inputs with 10 classes, with non-zero adaLN/final weights.

    DiT's zero init makes every block an identity map, which would let broken code pass; the
    random re-init below makes every block matter.
    """
    torch.manual_seed(seed)
    cfg = dict(input_size=16, in_channels=1, num_classes=10, fused_attn=fused_attn) | kwargs
    model = DiT_models["DiT-T/4"](**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A CLI test's ``--threads 1`` sets the whole process's torch threads: restore them after each
    test, so no test's speed (or a timing-free result that depends on thread count) hangs on the order
    the tests ran in."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
