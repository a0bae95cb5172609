"""Model adapters: everything qc-compiler knows about one model family, in one frozen object.

A family (our DiT, diffusers' DiT, ...) is described once, by a :class:`ModelAdapter` registered under
the class names it serves. ``qc.compile(model)`` picks the adapter from the model's class; passes,
backends and the runtime ask the adapter (through the pass context) and never name a family. An
adapter says:

- the forward's inputs (:class:`ForwardInputs`) and, in :meth:`ModelAdapter.example_inputs`, the one
  place where example inputs are built;
- what samplers and passes read off the model (:class:`ModelInfo`, with the null condition for CFG);
- where the blocks and their branches are (:class:`~qc_compiler.graph.BlockLayout`);
- which linears quantization covers, and which are conditioning linears (weight-only by default);
- how to capture (``"fx"`` or ``"export"``), and the module to capture (:meth:`ModelAdapter.wrap`);
- how to save and rebuild the model (:meth:`ModelAdapter.config`, :meth:`ModelAdapter.build`);
- how the compiled model goes back into its pipeline (:meth:`ModelAdapter.to_pipeline`).

Adding a family is one file that subclasses :class:`ModelAdapter` and calls :func:`register_adapter`.

Example:
    >>> from qc_compiler.models.dit import DiT_models
    >>> model = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10)
    >>> adapter = adapter_for(model)
    >>> adapter.name, adapter.info(model).null_label, [x.shape[0] for x in adapter.example_inputs(adapter.info(model))]
    ('dit', 10, [2, 2, 2])
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from ..capture import CAPTURE_MODES
from ..errors import ArtifactError, QCError
from ..graph import BlockLayout
from ..options import check_int

__all__ = ["ModelInfo", "Geometry", "ForwardInputs", "ModelAdapter", "ADAPTERS", "register_adapter", "adapter_for", "get_adapter", "adapter_of",
           "known_classes", "DTYPES", "dtype_name", "weights_dtype"]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"qc-compiler compiles float32, float16 and bfloat16 models, not {dtype}")


@dataclass(frozen=True)
class ModelInfo:
    """What samplers and passes read off a denoiser. ``num_classes`` is None for a model without
    class labels; the null (unconditional) label of a class-conditional one is ``num_classes``.
    ``dtype`` is the floating dtype of its weights, which its inputs are cast to. ``latent_shape`` is
    the shape of one sample's latent when it is not the square ``(in_channels, input_size,
    input_size)``: Flux's packed tokens ``(L, C)``, Wan's video ``(C, F, H, W)``."""

    input_size: int
    in_channels: int
    out_channels: int
    num_classes: Optional[int] = None
    dtype: str = "float32"
    latent_shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        for name in ("input_size", "in_channels", "out_channels"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), lo=1))
        if self.num_classes is not None:
            object.__setattr__(self, "num_classes", check_int("num_classes", self.num_classes, lo=1))
        if self.latent_shape is not None:
            object.__setattr__(self, "latent_shape",
                               tuple(check_int("latent_shape", d, lo=1) for d in self.latent_shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def learn_sigma(self) -> bool:
        """The output carries variance channels after the predicted noise (DiT's learned sigma)."""
        return self.out_channels == 2 * self.in_channels

    @property
    def null_label(self) -> Optional[int]:
        return self.num_classes

    @property
    def channels_last(self) -> bool:
        """One sample is tokens x channels (Flux's packed latent): channels are the last axis."""
        return self.latent_shape is not None and len(self.latent_shape) == 2

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        if self.latent_shape is not None:
            return self.latent_shape
        return (self.in_channels, self.input_size, self.input_size)

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        if d["latent_shape"] is None:
            del d["latent_shape"]  # the square default: the files of class-conditional models stay as they were
        else:
            d["latent_shape"] = list(d["latent_shape"])
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ModelInfo":
        try:
            return cls(**{k: d[k] for k in ("input_size", "in_channels", "out_channels", "num_classes")},
                       dtype=d.get("dtype", "float32"), latent_shape=d.get("latent_shape"))
        except KeyError as e:
            raise ArtifactError(f"model info is missing {e}; the file was not written by this qc-compiler") from None


@dataclass(frozen=True)
class Geometry:
    """The size a text-conditioned transformer is compiled for, in latent units: ``height`` x ``width``
    latent pixels (after the VAE, before patching or packing), ``frames`` latent frames (video), and
    ``text_tokens`` text tokens. None takes the family's default (the config's ``sample_size``, the
    pipeline's default prompt length). The compiled graph serves this size only.

    Example:
        >>> Geometry(height=64, width=64, text_tokens=77).to_json()["text_tokens"]
        77
    """

    height: Optional[int] = None
    width: Optional[int] = None
    frames: Optional[int] = None
    text_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("height", "width", "frames", "text_tokens"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(name, getattr(self, name), lo=1))

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ForwardInputs:
    """Names of the captured forward's inputs: latent, timestep, condition, then extra keyword inputs
    (text states, pooled projections, image/text ids, guidance) for families that have them.
    ``timestep_dtype``: what the compiled model casts timesteps to before its graph (``"float32"``
    serves integer and fractional schedules alike; ``"int64"`` for a model that indexes by t).
    ``timestep_divisor``: the model is called with the scheduler's timestep divided by this (Flux's
    pipeline divides by 1000, so its transformer sees ``t / 1000``); samplers divide through
    :func:`~qc_compiler.step.model_timestep`, and the compiled step table holds what the model sees."""

    latent: str = "x"
    timestep: str = "t"
    condition: str = "y"
    extra: Tuple[str, ...] = ()
    timestep_dtype: str = "int64"
    timestep_divisor: int = 1

    def __post_init__(self) -> None:
        if self.timestep_dtype not in ("int64", "float32"):
            raise ValueError(f"timestep_dtype must be 'int64' or 'float32', got {self.timestep_dtype!r}")
        object.__setattr__(self, "extra", tuple(self.extra))
        object.__setattr__(self, "timestep_divisor", check_int("timestep_divisor", self.timestep_divisor, lo=1))

    @property
    def conditions(self) -> Tuple[str, ...]:
        """The inputs after the latent and the timestep: the condition, then the extra inputs."""
        return (self.condition, *self.extra)

    @property
    def torch_timestep_dtype(self) -> torch.dtype:
        return torch.int64 if self.timestep_dtype == "int64" else torch.float32

    @property
    def names(self) -> Tuple[str, ...]:
        return (self.latent, self.timestep, self.condition, *self.extra)


@dataclass(frozen=True)
class ModelAdapter:
    """One model family. Data fields describe it; methods (overridden per family) act on its models.

    ``classes`` are the class names it serves, matched against a model's class and its bases.
    ``quantizable`` and ``conditioning_linears`` are globs over module paths in the captured graph.
    """

    name: str
    classes: Tuple[str, ...]
    blocks: BlockLayout
    quantizable: Tuple[str, ...]
    conditioning_linears: Tuple[str, ...] = ()
    inputs: ForwardInputs = ForwardInputs()
    capture_mode: str = "fx"
    leaf_modules: Tuple[Type[nn.Module], ...] = ()
    conditioning: str = "label"  # "label": class labels y; "text": prompt embeddings (a ConditionBank)

    def __post_init__(self) -> None:
        if self.conditioning not in ("label", "text"):
            raise ValueError(f"conditioning must be 'label' or 'text', got {self.conditioning!r}")
        if self.capture_mode not in CAPTURE_MODES:
            raise ValueError(f"capture_mode must be one of {list(CAPTURE_MODES)}, got {self.capture_mode!r}")
        for name in ("classes", "quantizable", "conditioning_linears", "leaf_modules"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def text_conditioned(self) -> bool:
        return self.conditioning == "text"

    # --- what a family overrides -------------------------------------------------------------------
    def info(self, model: nn.Module) -> ModelInfo:
        """Read the model's :class:`ModelInfo` (default: ``input_size``, ``in_channels``, ... attributes)."""
        try:
            return ModelInfo(input_size=model.input_size, in_channels=model.in_channels,
                             out_channels=getattr(model, "out_channels", model.in_channels),
                             num_classes=getattr(model, "num_classes", None), dtype=weights_dtype(model))
        except AttributeError as e:
            raise QCError(f"adapter {self.name!r}: {type(model).__name__} does not say {e}; override info()") from None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to capture, with the forward ``inputs`` names (default: the model itself)."""
        return model

    def for_model(self, model: nn.Module, geometry: Optional[Geometry] = None) -> "ModelAdapter":
        """This adapter set up for ``model`` (a text family reads its condition shapes off the config)."""
        return self.configured(geometry)

    def for_build(self, build: Dict[str, Any]) -> "ModelAdapter":
        """This adapter as it was set up for a compiled model (from its build record: the source
        config and the geometry), without the source model."""
        return self

    def configured(self, geometry: Optional[Geometry]) -> "ModelAdapter":
        """This adapter for models compiled at ``geometry`` (a text family's latent and prompt size)."""
        if geometry is None:
            return self
        raise QCError(f"the {self.name!r} family has a fixed input size: geometry= is for text-conditioned "
                      "transformers (PixArt, SD3, Flux, Sana, Wan)")

    @property
    def geometry_json(self) -> Optional[Dict[str, Any]]:
        """The geometry this adapter is configured for (saved with compiled models); None for fixed-size families."""
        return None

    def source(self, model: nn.Module) -> nn.Module:
        """The module whose config and weights are saved (undoes :meth:`wrap`; default: the model)."""
        return model

    def example_inputs(self, info: ModelInfo, batch: int = 2) -> Tuple[torch.Tensor, ...]:
        """Inputs of one forward, in ``inputs`` order. This is the only place they are built: capture,
        FLOP counts, ONNX export and benchmarks all ask here. Batch 2 keeps export's batch dynamic."""
        return (torch.randn(batch, *info.sample_shape, dtype=info.torch_dtype),
                torch.full((batch,), 500, dtype=self.inputs.torch_timestep_dtype), torch.zeros(batch, dtype=torch.long))

    def null_condition(self, info: ModelInfo) -> Optional[int]:
        """The condition CFG's unconditional half uses (the null class label)."""
        return info.null_label

    def config(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        """A JSON config that :meth:`build` turns back into this model (None: cannot be saved)."""
        return None

    def build(self, config: Dict[str, Any]) -> nn.Module:
        """A model from :meth:`config`'s output, with random weights (the saved ones are loaded next)."""
        raise ArtifactError(f"the {self.name!r} adapter cannot rebuild models from a saved config")

    def to_pipeline(self, compiled: nn.Module, original: nn.Module) -> nn.Module:
        """What goes back into the family's pipeline in place of ``original`` (default: ``compiled``)."""
        return compiled

    def pipeline_forward(self, compiled: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The family's pipeline call on the compiled model (a diffusers family maps its keyword
        inputs and output type here)."""
        return compiled(*args, **kwargs)

    def pipeline_sampler(self, pipe: Any, num_inference_steps: int, guidance_scale: float) -> Any:
        """The sampler whose step table follows ``pipe``'s scheduler call for call."""
        raise QCError(f"the {self.name!r} adapter does not know this family's pipelines; compile the transformer "
                      "with a sampler and set pipe.transformer yourself")


def weights_dtype(model: nn.Module) -> str:
    """The name of the floating dtype of a model's weights (float32 for a model without any)."""
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(floating) > 1:
        raise QCError(f"{type(model).__name__} mixes weight dtypes {sorted(map(str, floating))}; cast it to one "
                      "(model.to(dtype)) before compiling")
    return dtype_name(floating.pop()) if floating else "float32"


ADAPTERS: Dict[str, ModelAdapter] = {}
_BY_CLASS: Dict[str, str] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make ``adapter`` the one ``qc.compile`` uses for models of its ``classes``."""
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"register_adapter takes a ModelAdapter, got {type(adapter).__name__}")
    ADAPTERS[adapter.name] = adapter
    for cls in adapter.classes:
        _BY_CLASS[cls] = adapter.name
    return adapter


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class (or the nearest base class that has one)."""
    for cls in type(model).__mro__:
        name = _BY_CLASS.get(cls.__name__)
        if name is not None:
            return ADAPTERS[name]
    known = ", ".join(sorted(_BY_CLASS)) or "none"
    raise QCError(
        f"no model adapter knows {type(model).__name__}; known classes: {known}. To compile another family, "
        "register one: qc_compiler.models.register_adapter(MyAdapter(name=..., classes=('MyModel',), blocks=..., "
        "quantizable=...)); see docs/adapters.md"
    )


def adapter_of(compiled: Any) -> ModelAdapter:
    """The adapter a compiled model was made with, set up as it was (``compiled.build``)."""
    return get_adapter(compiled.build.get("adapter", "dit")).for_build(compiled.build)


def get_adapter(name: str) -> ModelAdapter:
    if name not in ADAPTERS:
        raise ArtifactError(f"no model adapter named {name!r} is registered here; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name]


def known_classes() -> List[str]:
    return sorted(_BY_CLASS)
