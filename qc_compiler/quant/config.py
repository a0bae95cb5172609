"""What to quantize and how: ``LayerQuant`` for one op, ``QuantConfig`` for a model.

Defaults follow docs/method.md section 2: every linear layer in the DiT blocks (qkv, proj, fc1, fc2 and
the adaLN modulation) and in the final layer (diffusers' names: ``transformer_blocks.*``,
``proj_out_*``), weights per output channel (symmetric, MSE-searched), activations per tensor
(asymmetric, min-max); norms and softmax stay in float; the two attention matmuls are optional.

One departure, ours: the conditioning linears (``weight_only`` patterns: the adaLN modulation and
diffusers' equivalents) keep int8 weights but take their input in float (``act_bits=None``). They
run on one row per sample, not per token (under 1% of the FLOPs), so INT8 activations buy no speed
there, yet their per-tensor input range must span every timestep's embedding, and their outputs
(shift, scale, gate) move every token at once: on the embedded model they caused about half of the
W8A8 sampling error (docs/RESULTS.md). ``weight_only=()`` restores the paper's all-W8A8 setting. Overrides are ordered ``(pattern, LayerQuant | None)`` pairs; the last match
wins; ``None`` keeps the op in float. A pattern is a glob over the module path
(``"blocks.*.mlp.fc2"``) or an op type (``"op:linear"``, ``"op:matmul"``).

Example:
    >>> cfg = QuantConfig.preset("w8a8").override("final_layer.*", None).override("*.fc2", weight_bits=4)
    >>> cfg.for_op("blocks.3.mlp.fc2", "linear").weight_bits, cfg.for_op("final_layer.linear", "linear")
    (4, None)
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

from .observers import OBSERVERS
from .qparams import check_bits

__all__ = ["LayerQuant", "QuantConfig", "PRESETS"]


@dataclass(frozen=True)
class LayerQuant:
    """How one op is quantized. Checked when built."""

    weight_bits: int = 8
    act_bits: Optional[int] = 8  # None: weight-only (the input stays float)
    weight_observer: str = "mse"
    act_observer: str = "minmax"

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        for name in (self.weight_observer, self.act_observer):
            if name not in OBSERVERS:
                raise ValueError(f"unknown observer {name!r}; known: {sorted(OBSERVERS)}")


# The linears that map the conditioning embedding (one row per sample) to modulation parameters:
# ours and facebookresearch/DiT's adaLN, diffusers' AdaLayerNormZero (norm1.linear, and the
# timestep/label embedder inside it) and its final-layer proj_out_1.
CONDITIONING_LINEARS = ("*adaLN_modulation*", "*.norm1.linear", "*.norm1.emb.*", "*proj_out_1")


@dataclass(frozen=True)
class QuantConfig:
    default: LayerQuant = field(default_factory=LayerQuant)
    include: Tuple[str, ...] = ("blocks.*", "final_layer.*", "*transformer_blocks.*", "*proj_out_*")
    overrides: Tuple[Tuple[str, Optional[LayerQuant]], ...] = ()
    attn_matmuls: bool = False
    act_step_groups: int = 1  # >1: activation ranges per group of consecutive sampling steps
    weight_only: Tuple[str, ...] = CONDITIONING_LINEARS  # selected layers here get act_bits=None

    def __post_init__(self) -> None:
        if self.act_step_groups < 1:
            raise ValueError(f"act_step_groups must be >= 1, got {self.act_step_groups}")

    @classmethod
    def preset(cls, name: str, **kwargs: Any) -> "QuantConfig":
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        w, a = PRESETS[key]
        return cls(default=LayerQuant(weight_bits=w, act_bits=a), **kwargs)

    def override(self, pattern: str, spec: Optional[LayerQuant] = ..., **changes: Any) -> "QuantConfig":
        """A new config with one more override: ``spec`` (None = float), or ``changes`` to the default."""
        if spec is ...:
            spec = replace(self.default, **changes)
        return replace(self, overrides=self.overrides + ((pattern, spec),))

    def for_op(self, path: str, op: str) -> Optional[LayerQuant]:
        """The LayerQuant for the op at ``path`` of type ``op`` ("linear" or "matmul"), or None (float)."""
        if op == "matmul" and not self.attn_matmuls:
            chosen: Optional[LayerQuant] = None
        else:
            chosen = self.default if any(fnmatch.fnmatchcase(path, p) for p in self.include) else None
            if chosen is not None and op == "linear" and any(fnmatch.fnmatchcase(path, p) for p in self.weight_only):
                chosen = replace(chosen, act_bits=None)
        for pattern, spec in self.overrides:
            hit = pattern == f"op:{op}" if pattern.startswith("op:") else fnmatch.fnmatchcase(path, pattern)
            if hit:
                chosen = spec
        return chosen

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["overrides"] = [[p, s] for p, s in d["overrides"]]
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "QuantConfig":
        return cls(default=LayerQuant(**d["default"]), include=tuple(d["include"]),
                   overrides=tuple((p, LayerQuant(**s) if s is not None else None) for p, s in d["overrides"]),
                   attn_matmuls=d["attn_matmuls"], act_step_groups=d["act_step_groups"],
                   weight_only=tuple(d.get("weight_only", ())))  # older artefacts quantized them fully


PRESETS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
