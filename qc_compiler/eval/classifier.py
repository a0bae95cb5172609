"""A small MNIST digit CNN that stands in for Inception when scoring 32x32 digit samples.

Inception-v3 features say little about 32x32 grey digits (and its weights cannot be fetched here), so
the evaluator scores samples with a CNN trained on the same digits: its penultimate features drive
FID and precision/recall, a few channels of an early conv map drive sFID (as sFID uses the first
channels of Inception's ``mixed_6/conv``), and its posteriors drive the Inception Score and the
class accuracy of class-conditional samples.

Example:
    >>> import torch
    >>> net = DigitClassifier().eval()
    >>> feats = net.features(torch.zeros(2, 1, 32, 32))
    >>> tuple(feats["pool"].shape), tuple(feats["spatial"].shape), tuple(feats["logits"].shape)
    ((2, 128), (2, 1024), (2, 10))
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ArtifactError
from ..io import load_tensors

__all__ = ["ClassifierConfig", "DigitClassifier", "load_classifier", "classifier_config_json", "DEFAULT_CLASSIFIER_PATH"]

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "digit-classifier.safetensors"
_TRAIN_HINT = "run `python scripts/train_classifier.py` to train it and write the evaluator assets"


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of the CNN; stored as JSON in the weights' metadata so a file rebuilds its own net."""

    width: int = 32            # channels of the first conv; later stages use 2x and 4x this
    num_classes: int = 10
    image_size: int = 32
    spatial_channels: int = 4  # channels of the 16x16 stage-2 map kept for sFID: 4 * 16 * 16 = 1024 dims
    dropout: float = 0.2
    first_kernel: int = 5      # a 5x5 first conv sees a whole stroke width before the first pool
    convs_16: int = 2          # 3x3 convs at 16x16 (the stage whose map feeds sFID)


def _conv_bn(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    # BatchNorm makes the net train to >98.5% in a few epochs on 4k digits; eval mode freezes it.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class DigitClassifier(nn.Module):
    """Conv stages at 32x32, 16x16, 8x8 and 4x4 (BN + ReLU, max-pooled), global average pool, one linear layer.

    Inputs are (N, 1, 32, 32) in [-1, 1]. ``forward`` returns logits (N, 10); ``features`` returns
    ``pool`` (N, 4*width), ``spatial`` (N, spatial_channels*16*16) and ``logits``.
    """

    def __init__(self, config: Optional[ClassifierConfig] = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        w = self.config.width
        if self.config.image_size != 32:
            raise ValueError(f"DigitClassifier is built for 32x32 inputs, got image_size={self.config.image_size}")
        if not 1 <= self.config.spatial_channels <= 2 * w:
            raise ValueError(f"spatial_channels must be in [1, {2 * w}], got {self.config.spatial_channels}")
        if self.config.first_kernel % 2 != 1 or self.config.convs_16 < 1:
            raise ValueError(f"first_kernel must be odd and convs_16 >= 1, got {self.config}")
        self.stage1 = _conv_bn(1, w, self.config.first_kernel)  # 32x32
        # 16x16 (after a 2x2 pool); the last conv's map is the sFID source
        self.stage2 = nn.Sequential(*[_conv_bn(w if i == 0 else 2 * w, 2 * w) for i in range(self.config.convs_16)])
        self.stage3 = _conv_bn(2 * w, 4 * w)  # 8x8
        self.stage4 = _conv_bn(4 * w, 4 * w)  # 4x4
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(4 * w, self.config.num_classes)

    @property
    def pool_dim(self) -> int:
        return 4 * self.config.width

    @property
    def spatial_dim(self) -> int:
        return self.config.spatial_channels * 16 * 16

    def _trunk(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 32, 32):
            raise ValueError(f"expected images of shape (N, 1, 32, 32), got {tuple(x.shape)}")
        h = F.max_pool2d(self.stage1(x), 2)
        s = self.stage2(h)                    # (N, 2w, 16, 16)
        h = F.max_pool2d(s, 2)
        h = F.max_pool2d(self.stage3(h), 2)
        h = self.stage4(h)
        pool = h.mean(dim=(2, 3))             # (N, 4w)
        return {"pool": pool, "spatial_map": s}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, 1, 32, 32) in [-1, 1]."""
        return self.head(self.dropout(self._trunk(x)["pool"]))

    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``pool`` (N, D) penultimate features, ``spatial`` (N, C*16*16) early map, ``logits`` (N, 10)."""
        t = self._trunk(x)
        spatial = t["spatial_map"][:, : self.config.spatial_channels].flatten(1)
        return {"pool": t["pool"], "spatial": spatial, "logits": self.head(t["pool"])}


def load_classifier(path: Optional[Union[str, Path]] = None) -> DigitClassifier:
    """Load the shipped classifier (fp32 or fp16 storage), in eval mode, as float32 on the CPU.

    Example:
        >>> net = load_classifier()          # doctest: +SKIP
        >>> net.training                     # doctest: +SKIP
        False
    """
    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    if not path.is_file():
        raise ArtifactError(f"digit classifier weights {path} are missing: {_TRAIN_HINT}")
    tensors, metadata = load_tensors(path)
    try:
        model = DigitClassifier(ClassifierConfig(**json.loads(metadata["config"])))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path} has no valid classifier config in its metadata ({e}): {_TRAIN_HINT}") from e
    expected = model.state_dict()
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ArtifactError(f"{path} does not match DigitClassifier (missing {missing[:5]}, unexpected {extra[:5]})")
    state = {}
    for name, ref in expected.items():
        t = tensors[name]
        if t.shape != ref.shape:
            raise ArtifactError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        # fp16 storage halves the file; compute always runs in fp32.
        state[name] = t.to(ref.dtype)
    model.load_state_dict(state)
    model.eval()
    logger.debug("loaded digit classifier from %s (held-out acc %s)", path, metadata.get("heldout_acc"))
    return model


def classifier_config_json(config: ClassifierConfig) -> str:
    """The config as the JSON string stored in the weights' metadata."""
    return json.dumps(asdict(config), sort_keys=True)
