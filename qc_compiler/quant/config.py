"""What to quantize and how: ``LayerQuant`` for one op, ``QuantConfig`` for a model.

Defaults follow docs/method.md section 2: every linear layer the model adapter lists as quantizable
(for DiT: qkv, proj, fc1, fc2 and the adaLN modulation in the blocks, and the final layer), weights
per output channel (symmetric, MSE-searched), activations per tensor (asymmetric, min-max); norms
and softmax stay in float; the two attention matmuls are optional. ``act_granularity="token"``
quantizes a layer's input per token at run time instead (no calibrated range; torch INT8 backend).

One departure, ours: the conditioning linears (the adapter's ``conditioning_linears``: DiT's adaLN
modulation and diffusers' equivalents) keep int8 weights but take their input in float
(``act_bits=None``). They run on one row per sample, not per token, so their GEMM is bound by reading
the weight, which int8 codes make four times smaller whatever the input (the backends' INT8 GEMM on the
codes: ``quant.weight_only``); a calibrated per-tensor input range, though, must span every timestep's
embedding, and their outputs (shift, scale, gate) move every token at once (measured in docs/RESULTS.md).
``weight_only=()`` restores the paper's all-W8A8 setting.

``include=None`` and ``weight_only=None`` mean "the model adapter's": :meth:`QuantConfig.resolve`
fills them in (the ``Quantize`` pass does, from its context). Overrides are ordered
``(pattern, LayerQuant | None)`` pairs; the last match wins; ``None`` keeps the op in float. A pattern
is a glob over the module path (``"blocks.*.mlp.fc2"``) or an op type (``"op:linear"``, ``"op:matmul"``).

Example:
    >>> cfg = QuantConfig.preset("w8a8", include=("blocks.*", "final_layer.*"), weight_only=("*adaLN*",))
    >>> cfg = cfg.override("final_layer.*", None).override("*.fc2", weight_bits=4)
    >>> cfg.for_op("blocks.3.mlp.fc2", "linear").weight_bits, cfg.for_op("final_layer.linear", "linear")
    (4, None)
    >>> cfg.for_op("blocks.3.adaLN_modulation.1", "linear").act_bits is None
    True
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

from ..errors import QCError
from ..options import check_bool, check_int
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
    # "tensor": one calibrated range per tensor (per step group); "token": each token's own range,
    # taken at run time (dynamic; qparams.token_qparams), nothing calibrated. Torch INT8 backend only.
    act_granularity: str = "tensor"

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        for name in (self.weight_observer, self.act_observer):
            if name not in OBSERVERS:
                raise ValueError(f"unknown observer {name!r}; known: {sorted(OBSERVERS)}")
        if self.act_granularity not in GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {list(GRANULARITIES)}, got {self.act_granularity!r}")
        if self.per_token and self.act_bits is None:
            raise ValueError("act_granularity='token' quantizes the input, but act_bits is None (weight-only): "
                             "set act_bits or leave act_granularity='tensor'")
        if self.per_token and self.act_observer != "minmax":
            raise ValueError(f"act_granularity='token' takes each token's own min and max at run time; "
                             f"act_observer={self.act_observer!r} has nothing to observe: leave it 'minmax'")

    @property
    def per_token(self) -> bool:
        """True when the input is quantized per token, at run time."""
        return self.act_granularity == "token"

    def to_json(self) -> Dict[str, Any]:
        """Its fields; ``act_granularity`` only when per token, so configs saved before it read the same."""
        d = asdict(self)
        if not self.per_token:
            del d["act_granularity"]
        return d


def _globs(name: str, value: Any) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of glob patterns, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class QuantConfig:
    default: LayerQuant = field(default_factory=LayerQuant)
    include: Optional[Tuple[str, ...]] = None  # None: the model adapter's quantizable linears
    overrides: Tuple[Tuple[str, Optional[LayerQuant]], ...] = ()
    attn_matmuls: bool = False
    act_step_groups: int = 1  # >1: activation ranges per group of consecutive sampling steps
    weight_only: Optional[Tuple[str, ...]] = None  # None: the adapter's conditioning linears; act_bits=None

    def __post_init__(self) -> None:
        if not isinstance(self.default, LayerQuant):
            raise ValueError(f"default must be a LayerQuant, got {type(self.default).__name__}")
        object.__setattr__(self, "include", _globs("include", self.include))
        object.__setattr__(self, "weight_only", _globs("weight_only", self.weight_only))
        check_bool("attn_matmuls", self.attn_matmuls)
        check_int("act_step_groups", self.act_step_groups, lo=1)
        if self.act_step_groups > 1 and self.all_per_token:
            raise ValueError("act_step_groups > 1 calibrates a range per group of steps, but every quantized "
                             "activation is act_granularity='token' (ranges taken at run time): use one or the other")
        for item in self.overrides:
            if len(item) != 2 or not isinstance(item[0], str) or not (item[1] is None or isinstance(item[1], LayerQuant)):
                raise ValueError(f"overrides must be (pattern, LayerQuant or None) pairs, got {item!r}")
        object.__setattr__(self, "overrides", tuple(tuple(o) for o in self.overrides))

    @property
    def specs(self) -> Tuple[LayerQuant, ...]:
        """Every LayerQuant this config can give an op: the default and each override's (not float's)."""
        return (self.default,) + tuple(s for _, s in self.overrides if s is not None)

    @property
    def all_per_token(self) -> bool:
        """True when every layer whose input this config quantizes takes it per token (none calibrated)."""
        quantized = [s for s in self.specs if s.act_bits is not None]
        return bool(quantized) and all(s.per_token for s in quantized)

    def resolve(self, adapter: Any) -> "QuantConfig":
        """This config with ``include``/``weight_only`` left at None taken from a model adapter."""
        return replace(self, include=adapter.quantizable if self.include is None else self.include,
                       weight_only=adapter.conditioning_linears if self.weight_only is None else self.weight_only)

    @property
    def bits(self) -> str:
        """The default bit widths as a preset-style name (``"w8a8"``; ``"w8"`` when weight-only)."""
        d = self.default
        return f"w{d.weight_bits}" + (f"a{d.act_bits}" if d.act_bits is not None else "")

    @classmethod
    def preset(cls, name: str, **kwargs: Any) -> "QuantConfig":
        if not isinstance(name, str) or name.lower() not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        w, a = PRESETS[name.lower()]
        return cls(default=LayerQuant(weight_bits=w, act_bits=a), **kwargs)

    def override(self, pattern: str, spec: Optional[LayerQuant] = ..., **changes: Any) -> "QuantConfig":
        """A new config with one more override: ``spec`` (None = float), or ``changes`` to the default."""
        if spec is ...:
            spec = replace(self.default, **changes)
        return replace(self, overrides=self.overrides + ((pattern, spec),))

    def for_op(self, path: str, op: str) -> Optional[LayerQuant]:
        """The LayerQuant for the op at ``path`` of type ``op`` ("linear" or "matmul"), or None (float)."""
        if self.include is None or self.weight_only is None:
            raise QCError("this QuantConfig leaves include/weight_only to the model adapter: resolve(adapter) it first")
        if op == "matmul" and not self.attn_matmuls:
            chosen: Optional[LayerQuant] = None
        else:
            chosen = self.default if any(fnmatch.fnmatchcase(path, p) for p in self.include) else None
            if chosen is not None and op == "linear" and any(fnmatch.fnmatchcase(path, p) for p in self.weight_only):
                chosen = replace(chosen, act_bits=None, act_granularity="tensor")
        for pattern, spec in self.overrides:
            hit = pattern == f"op:{op}" if pattern.startswith("op:") else fnmatch.fnmatchcase(path, pattern)
            if hit:
                chosen = spec
        return chosen

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["default"] = self.default.to_json()
        d["overrides"] = [[p, s.to_json() if s is not None else None] for p, s in self.overrides]
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "QuantConfig":
        """The config ``to_json`` wrote; an unknown or missing key is an error, not a default."""
        keys = {"default", "include", "overrides", "attn_matmuls", "act_step_groups", "weight_only"}
        if not isinstance(d, dict) or set(d) != keys:
            raise ValueError(f"a QuantConfig needs exactly the keys {sorted(keys)}, got "
                             f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        return cls(default=LayerQuant(**d["default"]), include=d["include"],
                   overrides=tuple((p, LayerQuant(**s) if s is not None else None) for p, s in d["overrides"]),
                   attn_matmuls=d["attn_matmuls"], act_step_groups=d["act_step_groups"], weight_only=d["weight_only"])


PRESETS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
GRANULARITIES = ("tensor", "token")
