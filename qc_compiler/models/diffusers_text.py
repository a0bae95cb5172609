"""What the text-conditioned diffusers families share: the denoiser signature, the adapter base, the
pipeline call.

Each family (``adapters/pixart.py``, ``sd3.py``, ``flux.py``, ``sana.py``, ``wan.py``) is one small
subclass of :class:`DiffusersTextAdapter` that says its blocks, its condition inputs and their
shapes, its latent, and its pipeline's timestep arguments. What follows is written once, here:

- :class:`DiffusersDenoiser` gives a transformer our signature ``(x, t, *conditions)``: the latent,
  the timestep exactly as the pipeline passes it, then the family's condition inputs in order
  (``encoder_hidden_states``, ``pooled_projections``, ``guidance``, masks). Inputs that are
  constants of a size (Flux's ``img_ids``/``txt_ids``) are buffers of the wrapper, computed from the
  :class:`~qc_compiler.models.Geometry` the model is compiled for.
- :meth:`DiffusersTextAdapter.pipeline_forward` maps a pipeline's keyword call onto that signature,
  checks the constants it passes against the compiled ones, and refuses what would change the
  compiled graph (attention kwargs, LoRA scales, skip-layer guidance).
- :meth:`DiffusersTextAdapter.pipeline_sampler` runs the pipeline's own scheduler loop
  (:class:`~qc_compiler.diffusion.PipelineSampler`) with the family's ``set_timesteps`` arguments.

diffusers itself is imported only when a model is built or a pipeline output is made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..diffusion.conditions import ConditionBank
from ..diffusion.scheduler_sampler import PipelineSampler
from ..errors import ArtifactError, QCError
from .adapter import DTYPES, Geometry, ModelAdapter, ModelInfo, weights_dtype
from .diffusers_model import qc_transformer

__all__ = ["DiffusersDenoiser", "DiffusersTextAdapter", "ConditionRow", "flow_shift_mu"]


@dataclass(frozen=True)
class ConditionRow:
    """One condition input: its name, the shape of one sample's row, and its dtype ("model": the weights')."""

    name: str
    shape: Tuple[int, ...]
    dtype: str = "model"

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.dtype == "model" else getattr(torch, self.dtype)


class DiffusersDenoiser(nn.Module):
    """A diffusers transformer called as ``(x, t, *conditions)``; see the module docstring."""

    def __init__(self, transformer: nn.Module, names: Tuple[str, ...], constants: Dict[str, torch.Tensor],
                 fixed: Dict[str, Any], unused: Tuple[str, ...] = ()):
        super().__init__()
        self.transformer = transformer.eval()
        self.names, self.unused, self.fixed = tuple(names), tuple(unused), dict(fixed)
        self.constant_names = tuple(constants)
        for k, v in constants.items():
            self.register_buffer(f"const_{k}", v, persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        kwargs = {n: c for n, c in zip(self.names, conditions) if n not in self.unused}
        kwargs.update({k: getattr(self, f"const_{k}") for k in self.constant_names})
        fixed = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.fixed.items()}
        return self.transformer(hidden_states=x, timestep=t, **kwargs, **fixed, return_dict=False)[0]


def _transformer(model: nn.Module) -> nn.Module:
    return model.transformer if isinstance(model, DiffusersDenoiser) else model


# keyword arguments a pipeline passes that leave the compiled graph as it is when empty
_NEUTRAL = ("joint_attention_kwargs", "attention_kwargs", "cross_attention_kwargs", "added_cond_kwargs",
            "block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples",
            "skip_layers", "encoder_hidden_states_image", "controlnet_blocks_repeat", "attention_mask")


@dataclass(frozen=True)
class DiffusersTextAdapter(ModelAdapter):
    """Base of the text-conditioned diffusers families. ``geometry`` is set by :meth:`for_model`
    (``qc.compile`` calls it): the size this adapter's example inputs and constants are built for."""

    geometry: Optional[Geometry] = None
    rows: Tuple[ConditionRow, ...] = ()
    # (transformer input, the pipeline's keyword for it, its negative-prompt keyword)
    prompt_inputs: Tuple[Tuple[str, str, Optional[str]], ...] = ()

    # --- what a family says ----------------------------------------------------------------------
    def default_geometry(self, cfg: Any) -> Geometry:
        """The family's defaults filled into :attr:`geometry` (override)."""
        raise NotImplementedError

    def latent(self, cfg: Any, geo: Geometry) -> Tuple[int, int, int, Tuple[int, ...]]:
        """(input_size, in_channels, out_channels, latent_shape) of one sample. Default: an image latent
        ``(C, H, W)`` (PixArt, SD3, Sana); Flux (packed tokens) and Wan (video) override it."""
        c = int(cfg.in_channels)
        return geo.height, c, int(cfg.out_channels or c), (c, geo.height, geo.width)

    def condition_rows(self, cfg: Any, geo: Geometry) -> List[ConditionRow]:
        """The condition inputs, in ``inputs.conditions`` order (override)."""
        raise NotImplementedError

    def constants(self, geo: Geometry, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """Inputs fixed by the geometry (Flux's ids); the wrapper holds them (default: none)."""
        return {}

    def fixed_kwargs(self, cfg: Any) -> Dict[str, Any]:
        """Keyword arguments the transformer always gets (PixArt's ``added_cond_kwargs``; default: none)."""
        return {}

    @staticmethod
    def text_width(cfg: Any) -> int:
        """Channels of one prompt token as the transformer takes it: the caption projection's input,
        or, with no projection (``caption_channels`` None), the cross-attention's."""
        channels = getattr(cfg, "caption_channels", None)
        return int(channels if channels is not None else cfg.cross_attention_dim)

    def unused(self, cfg: Any) -> Tuple[str, ...]:
        """Condition inputs this model's config does not read (Flux without guidance embeds; default: none)."""
        return ()

    def timestep_kwargs(self, pipe: Any, steps: int) -> Dict[str, Any]:
        """What the pipeline passes to ``scheduler.set_timesteps`` besides the step count (default: nothing)."""
        return {}

    # --- written once ----------------------------------------------------------------------------
    def for_model(self, model: nn.Module, geometry: Optional[Geometry] = None) -> "DiffusersTextAdapter":
        return self._setup(_transformer(model).config, geometry if geometry is not None else self.geometry)

    def for_build(self, build: Dict[str, Any]) -> "DiffusersTextAdapter":
        if not build.get("model_config"):
            raise ArtifactError(f"a compiled {self.name!r} model records no source config; compile it again")
        return self._setup(_Namespace(build["model_config"]), Geometry(**(build.get("geometry") or {})))

    def _setup(self, cfg: Any, geometry: Optional[Geometry]) -> "DiffusersTextAdapter":
        geo = _fill(geometry or Geometry(), self.default_geometry(cfg))
        return dataclasses.replace(self, geometry=geo, rows=tuple(self.condition_rows(cfg, geo)))

    def configured(self, geometry: Optional[Geometry]) -> "ModelAdapter":
        return dataclasses.replace(self, geometry=geometry) if geometry is not None else self

    @property
    def geometry_json(self) -> Optional[Dict[str, Any]]:
        return self.geometry.to_json() if self.geometry is not None else {}

    def _geo(self) -> Geometry:
        if self.geometry is None or not self.rows:
            raise QCError(f"adapter {self.name!r} is not set up for a model yet: compile through qc.compile")
        return self.geometry

    def info(self, model: nn.Module) -> ModelInfo:
        cfg = _transformer(model).config
        geo = self.geometry if self.geometry is not None else _fill(Geometry(), self.default_geometry(cfg))
        size, cin, cout, shape = self.latent(cfg, geo)
        return ModelInfo(input_size=size, in_channels=cin, out_channels=cout, num_classes=None,
                         dtype=weights_dtype(_transformer(model)), latent_shape=shape)

    def example_inputs(self, info: ModelInfo, batch: int = 2) -> Tuple[torch.Tensor, ...]:
        self._geo()
        dtype = info.torch_dtype
        x = torch.randn(batch, *info.sample_shape, dtype=dtype)
        t = torch.full((batch,), 500.0, dtype=torch.float32) / self.inputs.timestep_divisor
        conds = []
        for row in self.rows:
            row_dtype = row.torch_dtype(dtype)
            conds.append(torch.ones(batch, *row.shape, dtype=row_dtype) if not row_dtype.is_floating_point
                         else torch.randn(batch, *row.shape, dtype=row_dtype))
        return (x, t, *conds)

    def wrap(self, model: nn.Module) -> nn.Module:
        if isinstance(model, DiffusersDenoiser):
            return model
        transformer = _transformer(model)
        geo = self._geo()
        return DiffusersDenoiser(transformer, self.inputs.conditions,
                                 self.constants(geo, DTYPES[weights_dtype(transformer)]),
                                 self.fixed_kwargs(transformer.config), self.unused(transformer.config))

    def source(self, model: nn.Module) -> nn.Module:
        return _transformer(model)

    def config(self, model: nn.Module) -> Dict[str, Any]:
        return {k: v for k, v in dict(_transformer(model).config).items() if not k.startswith("_")}

    def build(self, config: Dict[str, Any]) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, self.classes[0], None)
        if cls is None:
            raise ArtifactError(f"diffusers here has no {self.classes[0]}; install a diffusers that does")
        return cls.from_config(config)

    def to_pipeline(self, compiled: nn.Module, original: nn.Module) -> nn.Module:
        return qc_transformer(compiled, _transformer(original), self)

    def pipeline_forward(self, compiled: nn.Module, hidden_states=None, timestep=None, return_dict: bool = True,
                         **kwargs: Any):
        """The transformer's keyword call (as its pipeline makes it) on the compiled model."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        geo = self.for_build(compiled.build).geometry
        for name, expected in self.constants(geo, compiled.dtype).items():
            given = kwargs.pop(name, None)
            if given is not None:
                given = given[0] if given.ndim == expected.ndim + 1 else given  # an old batched id tensor
                if tuple(given.shape) != tuple(expected.shape):
                    raise QCError(f"{name} differs from the compiled model's: it was compiled for {geo}; compile for "
                                  "this size (qc.compile_pipeline(..., height=, width=))")
                if not torch.equal(given.to(expected), expected):
                    raise QCError(f"{name} is not the position grid the model was compiled for ({geo}): the ids are "
                                  "compiled constants, so pipelines that pass other ids (e.g. Kontext) are not served")
        conds = []
        for name in self.inputs.conditions:
            value = kwargs.pop(name, None)
            if value is None and name == "encoder_attention_mask" and conds:
                # diffusers' mask is optional: none means every prompt token counts, as an all-ones mask
                value = torch.ones(conds[0].shape[:2], dtype=torch.int64, device=conds[0].device)
            if value is None:
                if name in self.unused(_Namespace(compiled.build.get("model_config") or {})):
                    value = torch.zeros(hidden_states.shape[0], dtype=torch.float32, device=hidden_states.device)
                else:
                    raise QCError(f"the pipeline passed no {name}, which the compiled model takes")
            conds.append(value)
        for name, value in kwargs.items():
            if name not in _NEUTRAL:
                raise QCError(f"{self.name}: the compiled transformer does not take {name}")
            if value is not None and not _neutral(value):
                raise QCError(f"{name}={value!r} changes the compiled graph (attention processors, LoRA scales, "
                              "skipped layers, control inputs); apply it to the source model and compile again")
        out = compiled(hidden_states, timestep, *conds)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def pipeline_sampler(self, pipe: Any, num_inference_steps: int, guidance_scale: float) -> PipelineSampler:
        return PipelineSampler(pipe.scheduler, num_inference_steps, guidance_scale,
                               self.timestep_kwargs(pipe, num_inference_steps))

    def latent_scale(self, pipe: Any) -> int:
        """Pixels per latent pixel in the pipeline (its VAE's spatial factor)."""
        return int(pipe.vae_scale_factor)

    def pipeline_geometry(self, pipe: Any, embeds: Dict[str, torch.Tensor], *, height: Optional[int],
                          width: Optional[int], num_frames: Optional[int]) -> Geometry:
        """The geometry a pipeline call with ``height`` x ``width`` pixels (and ``num_frames``) and these
        prompt embeddings runs at; None keeps the family's default."""
        if num_frames is not None:
            raise QCError(f"{type(pipe).__name__} makes images: num_frames is for video pipelines")
        scale = self.latent_scale(pipe)
        first = embeds.get(self.prompt_inputs[0][1])
        return Geometry(height=height // scale if height else None, width=width // scale if width else None,
                        text_tokens=int(first.shape[1]) if first is not None else None)

    def pipeline_conditions(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Optional[ConditionBank]:
        """The calibration prompts from the pipeline's own keyword arguments (``prompt_embeds=``,
        ``pooled_prompt_embeds=``, ``negative_prompt_embeds=``, ...); None when none are given."""
        known = {kw for _, kw, neg in self.prompt_inputs for kw in (kw, neg) if kw}
        unknown = sorted(set(embeds) - known)
        if unknown:
            raise QCError(f"{self.name}: unknown prompt inputs {unknown}; this family's pipeline takes {sorted(known)}")
        if not embeds:
            return None
        rows, null = {}, {}
        for name, kw, neg in self.prompt_inputs:
            if kw not in embeds:
                raise QCError(f"{self.name}: give {kw}= with the other prompt embeddings")
            rows[name] = embeds[kw]
            if guidance_scale > 1 and neg is not None:
                if neg not in embeds:
                    raise QCError(f"guidance_scale {guidance_scale} runs classifier-free guidance: give {neg}= too "
                                  "(the negative or empty prompt's embeddings)")
                negative = torch.as_tensor(embeds[neg])
                if not all(torch.equal(negative[0], r) for r in negative):
                    raise QCError(f"{neg} must be one negative prompt for every calibration prompt")
                null[name] = negative[:1]
        rows.update(self.extra_conditions(rows, guidance_scale))
        return ConditionBank(self.inputs.conditions, rows, null=null or None)

    def extra_conditions(self, rows: Dict[str, torch.Tensor], guidance_scale: float) -> Dict[str, torch.Tensor]:
        """Condition inputs the pipeline makes itself (Flux's guidance; default: none)."""
        return {}


class _Namespace(dict):
    """A saved config dict read like a diffusers ``FrozenDict`` (``cfg.in_channels``, ``cfg.get``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _neutral(value: Any) -> bool:
    """An empty dict, or a dict of Nones (PixArt's ``added_cond_kwargs`` at sizes without them), or False."""
    if isinstance(value, dict):
        return all(v is None for v in value.values())
    return value is False or (isinstance(value, (list, tuple)) and not value)


def _fill(geo: Geometry, defaults: Geometry) -> Geometry:
    return Geometry(**{k: (v if v is not None else getattr(defaults, k)) for k, v in geo.to_json().items()})


def flow_shift_mu(scheduler_config: Any, image_seq_len: int) -> float:
    """The dynamic shift ``mu`` Flux and SD3 pipelines give ``set_timesteps``: linear in the number of
    image tokens, between the scheduler config's base and max (the pipelines' ``calculate_shift``)."""
    get = scheduler_config.get
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    b = base_shift - m * base_len
    return image_seq_len * m + b
