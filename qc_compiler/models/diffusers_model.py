"""A compiled model shaped like a diffusers model: what goes back into a pipeline in place of its
transformer, and what ``pipe.save_pretrained`` writes and ``from_pretrained`` reads.

``QCTransformer`` subclasses diffusers' ``ModelMixin`` and ``ConfigMixin``, so a pipeline treats it as
one of its own models:

- ``config`` mirrors the original transformer's (``sample_size``, ``in_channels``, ...); ``dtype`` and
  ``device`` are the compiled model's;
- ``eval()`` / ``train(False)`` are no-ops, ``train(True)`` is refused;
- ``to(device, dtype)`` compiles again for that device and dtype (INT8 kernels and calibrated
  scales belong to one); the same device and dtype are a no-op;
- ``save_pretrained(folder)`` writes ``config.json`` and the compiled artefact (manifest plus
  safetensors, every byte hashed) in ``folder/qc.compiled`` (``qc.<variant>`` for a variant); ``from_pretrained(folder)`` reads them back, so ``pipe.save_pretrained`` and
  ``Pipeline.from_pretrained`` round-trip the compiled transformer;
- what cannot apply to a compiled graph (attention processors, diffusers' own caches, layerwise
  casting, gradient checkpointing, LoRA) is refused with the reason (docs/diffusers.md has the table).

The family's call signature comes from its adapter's ``pipeline_forward``. diffusers is imported
only when the class is first used (``QCTransformer`` is built on first access).

Example:
    >>> pipe.transformer = qc_transformer(compiled, pipe.transformer, adapter)    # doctest: +SKIP
    >>> pipe.save_pretrained("out/pipe"); DiTPipeline.from_pretrained("out/pipe")  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from ..errors import ArtifactError, ArtifactNotFoundError, QCError, RefusedAttributeError

__all__ = ["qc_transformer", "transformer_class", "set_loader", "ARTEFACT", "REFUSED"]

log = logging.getLogger(__name__)

ARTEFACT = "qc.compiled"  # a dot in the name: diffusers reads a variant off the part after the first dot
_LOADER: Optional[Callable[[Path], nn.Module]] = None  # qc.load_compiled, set by the API layer above


def set_loader(load_compiled: Callable[[Path], nn.Module]) -> None:
    """How ``from_pretrained`` rebuilds a saved compiled model (``qc.load_compiled``; the API sets it)."""
    global _LOADER
    _LOADER = load_compiled

# method -> why a compiled transformer refuses it (docs/diffusers.md)
REFUSED: Dict[str, str] = {
    "set_attn_processor": "the attention is compiled into the graph; set the processor on the source model and "
                          "compile again",
    "enable_cache": "a compiled model caches with qc-compiler's own step cache: compile with "
                    "passes.StepCache(...) (docs/passes.md)",
    "disable_cache": "the step cache is compiled into the graph: compile again without passes.StepCache",
    "enable_layerwise_casting": "weights are int8 codes with calibrated scales; compile a model of the dtype you "
                                "want (model.to(dtype)) instead",
    "enable_gradient_checkpointing": "a compiled model is for inference; train the source model",
    "fuse_qkv_projections": "fuse on the source model, then compile it",
    "load_lora_adapter": "LoRA weights must be fused into the source model before compiling "
                         "(pipe.load_lora_weights, pipe.fuse_lora, then compile)",
    "set_adapters": "LoRA weights must be fused into the source model before compiling",
    "enable_group_offload": "offloading moves weights between devices; a compiled model is compiled for one",
}

_CLASS: Optional[type] = None


def transformer_class() -> type:
    """``QCTransformer``, defined on first use (it subclasses diffusers' ModelMixin)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _define()
    return _CLASS


def qc_transformer(compiled: nn.Module, original: nn.Module, adapter) -> nn.Module:
    """A ``QCTransformer`` around ``compiled`` with ``original``'s diffusers config. It stands in the
    pipeline for ``original``, and casts it along when the pipeline moves (as diffusers would)."""
    config = {k: v for k, v in dict(original.config).items() if not k.startswith("_")}
    model = transformer_class()(**config)
    model.attach(compiled, adapter.name, source=original)
    return model


def _default_attention(module: nn.Module) -> bool:
    """True when every attention processor of ``module`` is one of diffusers' defaults."""
    processors = getattr(module, "attn_processors", None)
    return processors is None or all(type(p).__name__ in ("AttnProcessor", "AttnProcessor2_0")
                                     for p in processors.values())


def _refuse(name: str):
    def method(self, *args: Any, **kwargs: Any):
        raise QCError(f"{type(self).__name__}.{name}: not on a compiled model: {REFUSED[name]}")

    method.__name__ = name
    method.__doc__ = f"Refused on a compiled model: {REFUSED[name]}."
    return method


def _define() -> type:
    from diffusers import ConfigMixin, ModelMixin

    class QCTransformer(ModelMixin, ConfigMixin):
        """A qc-compiler compiled transformer, shaped as a diffusers model (see the module docstring)."""

        config_name = "config.json"
        _supports_gradient_checkpointing = False

        def __init__(self, **config: Any):
            super().__init__()
            self.register_to_config(**config)
            self.compiled: Optional[nn.Module] = None
            self.adapter_name = ""
            self.default_attention = True  # the graph was captured with diffusers' default processors

        def attach(self, compiled: nn.Module, adapter_name: str, source: Optional[nn.Module] = None) -> None:
            self.compiled, self.adapter_name = compiled, adapter_name
            self.__dict__["_source"] = source  # the transformer this stands in for (not a submodule)
            if source is not None:
                self.default_attention = _default_attention(source)

        @contextlib.contextmanager
        def cache_context(self, name: str, **kwargs: Any):
            """The pipeline names its calls ("cond", "uncond"): each keeps its own cached tensors."""
            with self.compiled.stream(name):
                yield

        def __getattr__(self, name: str):
            # attn_processors is refused, not missing: hasattr() is False (diffusers probes with it), and
            # reading it says why (a property raising AttributeError would fall through to here anyway)
            if name == "attn_processors":
                raise RefusedAttributeError(f"{type(self).__name__}.attn_processors: not on a compiled model: "
                                            f"{REFUSED['set_attn_processor']}")
            return super().__getattr__(name)

        def set_default_attn_processor(self) -> None:
            """A no-op when the graph was captured with the default processors; else refused."""
            if not self.default_attention:
                raise QCError("set_default_attn_processor: the graph was compiled with other attention processors; "
                              "set the default ones on the source model and compile again")

        def _adapter(self):
            from .adapter import get_adapter

            return get_adapter(self.adapter_name)

        def forward(self, *args: Any, **kwargs: Any):
            if self.compiled is None:
                raise QCError("this QCTransformer holds no compiled model: load it with from_pretrained")
            return self._adapter().pipeline_forward(self.compiled, *args, **kwargs)

        @property
        def dtype(self) -> torch.dtype:
            return self.compiled.dtype

        @property
        def device(self) -> torch.device:
            return self.compiled.device

        def train(self, mode: bool = True):
            if mode:
                raise QCError("a compiled transformer is for inference; train the source model and compile again")
            self.training = False
            return self

        def to(self, *args: Any, **kwargs: Any):
            self.compiled = self.compiled.to(*args, **kwargs)  # compiles again if the device or dtype changes
            source = self.__dict__.get("_source")
            if source is not None:  # a pipeline casts its components in place: so is the one this replaced
                source.to(*args, **kwargs)
            return self

        def save_pretrained(self, save_directory, is_main_process: bool = True, variant: Optional[str] = None,
                            safe_serialization: bool = True, **kwargs: Any) -> None:
            """``config.json`` and the compiled artefact (``qc_compiled[.variant]/``) in ``save_directory``.
            Options of diffusers' that cannot apply (sharding, pushing, a custom save function) are refused,
            not ignored. ``safe_serialization=False`` (which pipelines pass on to every component) still
            writes safetensors: a compiled transformer never writes pickles, and says so."""
            if not safe_serialization:
                log.warning("save_pretrained(safe_serialization=False): the compiled transformer is written as "
                            "safetensors and JSON all the same (never pickles)")
            given = sorted(k for k, v in kwargs.items() if v not in (None, False))
            if given:
                raise QCError(f"save_pretrained({', '.join(given)}=...): not for a compiled transformer, which is one "
                              "artefact folder (manifest plus safetensors, not sharded) written locally")
            folder = Path(save_directory)
            if folder.exists() and not folder.is_dir():
                raise ArtifactError(f"{folder} is a file; save_pretrained writes a folder")
            if not is_main_process:
                return
            folder.mkdir(parents=True, exist_ok=True)
            self.compiled.save(folder / _artefact_name(variant))
            self.save_config(folder)
            with open(folder / self.config_name) as f:  # the adapter, so loading needs no guessing
                cfg = json.load(f)
            cfg["_qc_adapter"] = self.adapter_name
            from ..io import save_json

            save_json(cfg, folder / self.config_name)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None,
                            variant: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None, **kwargs: Any):
            """Load what ``save_pretrained`` wrote (a local folder; nothing is fetched)."""
            folder = Path(pretrained_model_name_or_path) / (subfolder or "")
            artefact = folder / _artefact_name(variant)
            if not artefact.is_dir():
                raise ArtifactNotFoundError(f"{folder} holds no compiled transformer ({_artefact_name(variant)}/ is "
                                            "missing)")
            if _LOADER is None:
                raise QCError("import qc_compiler before loading a compiled transformer")
            with open(folder / cls.config_name) as f:
                cfg = json.load(f)
            compiled = _LOADER(artefact)
            if torch_dtype is not None and torch_dtype != compiled.dtype:
                compiled = compiled.to(dtype=torch_dtype)
            config = {k: v for k, v in cfg.items() if not k.startswith("_")}
            model = cls(**config)
            model.attach(compiled, cfg.get("_qc_adapter") or compiled.build.get("adapter", ""))
            return model.eval()

    for name in REFUSED:
        setattr(QCTransformer, name, _refuse(name))
    QCTransformer.__module__ = __name__
    return QCTransformer


def _artefact_name(variant: Optional[str]) -> str:
    return ARTEFACT if not variant else f"qc.{variant}"


def __getattr__(name: str):
    # diffusers finds a custom component's class, and the base classes it compares it with, as
    # attributes of the module named in model_index.json: build them on first access
    if name == "QCTransformer":
        return transformer_class()
    if name in ("ModelMixin", "ConfigMixin", "SchedulerMixin", "DiffusionPipeline", "OnnxRuntimeModel",
                "BaseGuidance"):
        import diffusers

        return getattr(diffusers, name, None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
