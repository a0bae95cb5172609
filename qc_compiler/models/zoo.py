"""Model zoo: named configs, the embedded ``dit-mnist`` weights, and loading from local files.

Example:
    >>> model = load_model("DiT-T/4", input_size=16, num_classes=10)   # random init, by config name
    >>> model = load_model("dit-mnist")                                 # the embedded, trained weights
    >>> model = load_model("mmdit-mnist")   # the embedded text-conditioned SD3 transformer  # doctest: +SKIP
"""
from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..errors import ArtifactError
from ..io import check_finite, load_tensors, save_tensors
from .dit import DiT, DiT_models

__all__ = ["DEFAULT_MODEL_CONFIG", "ASSETS", "build_model", "load_model", "save_model_weights", "config_from_state_dict",
           "load_state_strict", "is_config_name"]

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# The embedded default: 32x32 digits, patch 4 (64 tokens), depth 6, width 128, 2 heads, learned sigma.
# Width 128 (not 192): it trains about twice as fast on 2 CPU cores, and steps matter more in a 2-hour
# CPU budget (docs/training.md).
DEFAULT_MODEL_CONFIG: Dict[str, Any] = dict(
    input_size=32, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=2,
    mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True,
)
EMBEDDED = {"dit-mnist": ASSETS / "dit-mnist.safetensors"}
# text-conditioned embedded models: diffusers transformers, loaded by their own module
EMBEDDED_TEXT = {"mmdit-mnist": ASSETS / "mmdit-mnist.safetensors"}


def build_model(config: Dict[str, Any]) -> DiT:
    """A randomly initialised DiT from a full config dict (as stored in weight files)."""
    return DiT(**config)


def save_model_weights(model: DiT, path: Path, extra: Optional[Dict[str, str]] = None) -> None:
    """Store a DiT as fp16 safetensors with its config in the metadata (about 2 bytes a parameter)."""
    config = {k: v for k, v in model.config.items() if k != "fused_attn"}
    tensors = {k: v.half() for k, v in model.state_dict().items()}
    save_tensors(tensors, path, metadata={"config": json.dumps(config), **(extra or {})})


def load_state_strict(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly; a missing, unexpected or mis-shaped key is an
    ``ArtifactError`` naming the key (and both shapes), and non-finite weights are refused."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or wrong:
        what = (f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") if missing
                else f"unexpected key {extra[0]!r}" if extra else
                f"key {wrong[0][0]!r} has shape {wrong[0][1]}, the model's is {wrong[0][2]}")
        raise ArtifactError(f"{source} does not fit the model: {what}")
    check_finite(state, source)
    model.load_state_dict(state, strict=True)
    return model


def _load_weights_file(path: Path) -> DiT:
    tensors, metadata = load_tensors(path)
    if "config" not in metadata:
        raise ArtifactError(f"{path} has no 'config' metadata; it was not written by qc-compiler")
    try:
        model = build_model(json.loads(metadata["config"]))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: its config does not build a DiT: {e}") from None
    return load_state_strict(model, {k: v.float() for k, v in tensors.items()}, str(path)).eval()


# Heads are not visible in a state dict's shapes; DiT's configs fix them by width.
_HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6, 192: 3, 128: 2, 64: 2}


def config_from_state_dict(sd: Dict[str, torch.Tensor], num_heads: Optional[int] = None) -> Dict[str, Any]:
    """Infer a DiT config from official-layout weights (depth, width, patch, channels, classes, sigma)."""
    try:
        hidden, in_ch, patch = sd["x_embedder.proj.weight"].shape[:3]
        tokens = sd["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        table = sd["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise ArtifactError(f"not a DiT state dict (facebookresearch/DiT layout): missing {e}") from e
    grid = int(round(tokens ** 0.5))
    heads = num_heads or _HEADS_BY_WIDTH.get(int(hidden), max(1, int(hidden) // 64))
    return dict(input_size=grid * int(patch), patch_size=int(patch), in_channels=int(in_ch), hidden_size=int(hidden),
                depth=depth, num_heads=heads, num_classes=int(table) - 1, class_dropout_prob=0.1,
                learn_sigma=out == 2 * in_ch)


def _load_torch_checkpoint(path: Path, num_heads: Optional[int] = None) -> DiT:
    """A facebookresearch/DiT ``.pt`` checkpoint: tensors only (``weights_only=True``), never pickled code."""
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "global" in str(e):
            raise ArtifactError(f"{path} needs pickled code to load, which qc-compiler refuses to run; "
                                "re-save its state dict (tensors only) or convert it to safetensors") from None
        raise ArtifactError(f"{path} is not a readable PyTorch checkpoint (corrupt?)") from None
    except (RuntimeError, EOFError) as e:
        raise ArtifactError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                            f"{str(e).splitlines()[0][:120]}") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # a training checkpoint: DiT samples from the EMA weights
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ArtifactError(f"{path} does not hold a state dict of tensors")
    model = build_model(config_from_state_dict(obj, num_heads))
    return load_state_strict(model, obj, str(path)).eval()


def is_config_name(name: str) -> bool:
    """True for a config name (``DiT-B/2``): ``load_model`` gives random weights for it."""
    return name in DiT_models


def load_model(name_or_path: str, **overrides: Any) -> nn.Module:
    """Load an embedded model (``"dit-mnist"``; ``"mmdit-mnist"``, diffusers' ``SD3Transformer2DModel``
    whose text encoder :func:`~qc_compiler.models.mmdit_mnist.load_mmdit` gives), a config name (random init), a local weights file
    (``.safetensors`` written by qc-compiler), or an official DiT checkpoint (``.pt``/``.pth``).

    Names match exactly; an unknown one is refused with the close matches. ``overrides`` (config
    fields) go with config names only, but for ``num_heads`` with an official checkpoint (heads are
    not visible in its shapes)."""
    allowed = set(overrides) if is_config_name(name_or_path) else (
        {"num_heads"} if Path(name_or_path).suffix in (".pt", ".pth") else set())
    if set(overrides) - allowed:
        raise ArtifactError(f"{sorted(set(overrides) - allowed)} only go with a config name (random init), "
                            f"not {name_or_path!r}")
    if name_or_path in EMBEDDED_TEXT:
        from .mmdit_mnist import load_mmdit

        return load_mmdit(EMBEDDED_TEXT[name_or_path]).transformer
    if name_or_path in EMBEDDED:
        path = EMBEDDED[name_or_path]
        if not path.is_file():
            raise ArtifactError(f"embedded weights {path} are missing; run scripts/train_default.py")
        return _load_weights_file(path)
    if is_config_name(name_or_path):
        log.info("%s is a config name: the model has random weights", name_or_path)
        return DiT_models[name_or_path](**overrides).eval()
    path = Path(name_or_path)
    if path.suffix == ".safetensors" and path.is_file():
        return _load_weights_file(path)
    if path.suffix in (".pt", ".pth") and path.is_file():
        return _load_torch_checkpoint(path, overrides.get("num_heads"))
    if path.suffix in (".safetensors", ".pt", ".pth"):
        raise ArtifactError(f"{path} is missing")
    names = sorted(EMBEDDED) + sorted(EMBEDDED_TEXT) + sorted(DiT_models)
    close = [n for n in names if n.lower() == name_or_path.lower()]  # a case slip first
    close += [n for n in difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.6) if n not in close]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ArtifactError(f"unknown model {name_or_path!r}{hint} Known: {', '.join(names)}, or a .safetensors/.pt path")
