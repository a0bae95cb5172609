"""``mmdit-mnist``: the embedded text-conditioned, flow-matching MMDiT (diffusers' ``SD3Transformer2DModel``).

Why SD3's class and not Flux's: both are MMDiTs (joint attention over image and text tokens, adaLN
per stream), and our ``sd3`` and ``flux`` adapters serve both. SD3's transformer patchifies itself,
so a 32x32 one-channel digit at patch 4 is 64 image tokens, as for ``dit-mnist``; Flux's pipeline
packs fixed 2x2 patches, which would make 256 tokens of 4 channels here, four times the cost per
step for the same picture on a 2-core CPU. SD3 is also the model of the rectified-flow MMDiT paper.

The model works in pixel space (no VAE): one sample is (1, 32, 32) in [-1, 1]. It reads the prompt
through :class:`~qc_compiler.models.digit_text.DigitTextEncoder` (64 wide, 8 tokens), trained with it.
One safetensors file holds both, in fp16, with the transformer's config, the encoder's, the attribute
thresholds and the flow shift in its metadata.

Example:
    >>> model = build_mmdit()                     # random init, the shipped architecture
    >>> model.config.num_layers, model.config.patch_size
    (6, 4)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ArtifactError
from ..io import check_finite, load_tensors, save_tensors
from .digit_text import AttributeThresholds, DigitTextEncoder
from .zoo import load_state_strict

__all__ = ["MMDIT_MNIST_CONFIG", "MMDIT_MNIST_PATH", "build_mmdit", "save_mmdit", "load_mmdit", "MMDiTMNIST",
           "condition_bank", "denoiser", "flow_sampler", "sample", "pipeline", "pipeline_kwargs", "prompt_table",
           "evaluation_labels"]

MMDIT_MNIST_PATH = Path(__file__).resolve().parents[1] / "assets" / "mmdit-mnist.safetensors"

# 6 joint blocks, width 128 (2 heads of 64), patch 4 on 32x32: 64 image tokens and 8 text tokens.
# RMS-normalised q/k (SD3.5's choice) keeps the attention logits tame at lr 1e-3 in bf16.
MMDIT_MNIST_CONFIG: Dict[str, Any] = dict(
    sample_size=32, patch_size=4, in_channels=1, out_channels=1, num_layers=6, attention_head_dim=64,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
    pos_embed_max_size=8, qk_norm="rms_norm",
)
TEXT_CONFIG: Dict[str, Any] = dict(width=64)


def build_mmdit(config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A randomly initialised ``SD3Transformer2DModel`` (the shipped architecture by default)."""
    try:
        import diffusers
    except ImportError:
        raise ArtifactError("mmdit-mnist is a diffusers model: pip install 'qc-compiler[diffusers]'") from None
    return diffusers.SD3Transformer2DModel(**(config or MMDIT_MNIST_CONFIG))


@dataclass
class MMDiTMNIST:
    """What the file holds: the transformer, its text encoder, the attribute thresholds and the flow shift."""

    transformer: nn.Module
    text_encoder: DigitTextEncoder
    thresholds: AttributeThresholds
    shift: float
    metadata: Dict[str, str]


def save_mmdit(transformer: nn.Module, text_encoder: DigitTextEncoder, thresholds: AttributeThresholds,
               path: Path, *, shift: float, extra: Optional[Dict[str, str]] = None) -> None:
    """Both modules as fp16 safetensors (atomically), their configs and the thresholds in the metadata."""
    tensors = {f"transformer.{k}": v.half() for k, v in transformer.state_dict().items()}
    tensors.update({f"text.{k}": v.half() for k, v in text_encoder.state_dict().items()})
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(transformer.config).items()
              if not k.startswith("_")}
    save_tensors(tensors, path, metadata={
        "config": json.dumps(config), "text_config": json.dumps(text_encoder.config),
        "thresholds": json.dumps(thresholds.table.tolist()), "shift": repr(float(shift)), **(extra or {})})


def load_mmdit(path: Optional[Path] = None) -> MMDiTMNIST:
    """The shipped model (or one written by ``save_mmdit``), in float32 and eval mode."""
    path = Path(path or MMDIT_MNIST_PATH)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; run scripts/train_mmdit.py")
    tensors, meta = load_tensors(path)
    try:
        config, text_config = json.loads(meta["config"]), json.loads(meta["text_config"])
        thresholds, shift = AttributeThresholds(torch.tensor(json.loads(meta["thresholds"]))), float(meta["shift"])
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{path} is not an mmdit-mnist file (metadata: {e})") from None
    check_finite(tensors, str(path))
    transformer = build_mmdit(config)
    encoder = DigitTextEncoder(**text_config)
    part = lambda prefix: {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    load_state_strict(transformer, part("transformer."), str(path))
    load_state_strict(encoder, part("text."), str(path))
    return MMDiTMNIST(transformer.eval(), encoder.eval(), thresholds, shift, meta)


# --- sampling: our flow sampler, or diffusers' own pipeline ------------------------------------------
CONDITION_NAMES = ("encoder_hidden_states", "pooled_projections")
DEFAULT_STEPS = 28
DEFAULT_CFG = 3.0  # the guidance the shipped model is measured at (docs/RESULTS.md)


def geometry(transformer: nn.Module):
    """The size the model is compiled for: its sample size in pixels (32x32 for the shipped one) and the
    text encoder's 8 tokens."""
    from .adapter import Geometry
    from .digit_text import MAX_TOKENS

    size = int(transformer.config.sample_size)
    return Geometry(height=size, width=size, text_tokens=MAX_TOKENS)


def condition_bank(encoder: DigitTextEncoder, prompts: Sequence[str]):
    """The prompts as a :class:`~qc_compiler.ConditionBank` (row i is prompt i), the empty prompt as
    its null row: what ``qc.compile(..., conditions=)`` calibrates with and ``bank.bind`` samples with."""
    from ..diffusion.conditions import ConditionBank

    rows, null = encoder.encode(list(prompts)), encoder.encode([""])
    return ConditionBank(CONDITION_NAMES, {"encoder_hidden_states": rows["prompt_embeds"],
                                           "pooled_projections": rows["pooled_prompt_embeds"]},
                         null={"encoder_hidden_states": null["prompt_embeds"][0],
                               "pooled_projections": null["pooled_prompt_embeds"][0]})


def denoiser(transformer: nn.Module) -> nn.Module:
    """The FP32 transformer called as ``(x, t, encoder_hidden_states, pooled_projections)``, as a compiled
    one is: the reference every compiled variant is measured against."""
    from .adapter import adapter_for

    net = adapter_for(transformer).for_model(transformer, geometry(transformer)).wrap(transformer)
    cfg = transformer.config
    net.sample_shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))  # what samplers draw
    return net


def flow_sampler(bundle: "MMDiTMNIST", steps: int = DEFAULT_STEPS, cfg_scale: float = DEFAULT_CFG):
    """Euler flow matching at the model's shift: the schedule of its diffusers pipeline."""
    from ..diffusion.flow import FlowMatchEuler

    return FlowMatchEuler(steps=steps, cfg_scale=cfg_scale, shift=bundle.shift)


def sample(bundle: "MMDiTMNIST", prompts: Sequence[str], *, steps: int = DEFAULT_STEPS,
           cfg_scale: float = DEFAULT_CFG, seed: int = 0, model: Optional[Any] = None,
           noise: Optional[torch.Tensor] = None, progress: bool = False) -> torch.Tensor:
    """Images (N, 1, 32, 32) in about [-1, 1] for ``prompts``, one each, with per-sample noise streams
    (sample i gets the same noise in every variant). ``model``: a compiled model (default: the FP32
    transformer); ``noise``: the initial noise, instead of the seed's streams."""
    unique = list(dict.fromkeys(prompts))
    bank = condition_bank(bundle.text_encoder, unique)
    labels = [unique.index(p) for p in prompts]
    net = model if model is not None else denoiser(bundle.transformer)
    with torch.no_grad():
        return flow_sampler(bundle, steps, cfg_scale).sample(bank.bind(net), labels, seed=seed, noise=noise,
                                                                  progress=progress)


def pipeline(bundle: "MMDiTMNIST", transformer: Optional[nn.Module] = None):
    """diffusers' ``StableDiffusion3Pipeline`` around the transformer (or a compiled one's drop-in from
    ``qc.compile_pipeline``). It has no VAE (the model works in pixels) and no text encoders: prompts
    come in as ``prompt_embeds`` from :func:`pipeline_kwargs`. Call it with ``output_type="latent"``."""
    import diffusers

    return diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=bundle.shift), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        transformer=transformer if transformer is not None else bundle.transformer)


def pipeline_kwargs(bundle: "MMDiTMNIST", prompts: Sequence[str], guidance_scale: float = DEFAULT_CFG) -> Dict[str, Any]:
    """What our text encoder hands the pipeline for ``prompts``: the prompt embeddings, and with guidance
    the empty prompt's as the negative ones; the pixel size the pipeline needs without a VAE."""
    kw = bundle.text_encoder.encode(list(prompts))
    if guidance_scale > 1:
        neg = bundle.text_encoder.encode([""] * len(prompts))
        kw.update(negative_prompt_embeds=neg["prompt_embeds"], negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"])
    # without a VAE the pipeline assumes 8 pixels per latent pixel: 256 "pixels" are our 32
    size = 8 * int(bundle.transformer.config.sample_size)
    return dict(kw, guidance_scale=guidance_scale, height=size, width=size, output_type="latent")


# --- evaluation: prompts with attributes, as indices into one table ----------------------------------
def prompt_table():
    """Every prompt the evaluation uses, index ``9 d + 3 (thickness + 1) + (slant + 1)``: the ten digits,
    each plain, thin or thick, and upright, left- or right-slanted (90 prompts)."""
    from .digit_text import DIGITS, describe

    return [describe(d, th, sl) for d in range(len(DIGITS)) for th in (-1, 0, 1) for sl in (-1, 0, 1)]


def evaluation_labels(n: int, seed: int = 0):
    """Indices into :func:`prompt_table` for ``n`` samples: digit ``i % 10``, thickness and slant drawn
    uniformly from a generator seeded with ``seed`` (the same list for every variant of a run)."""
    gen = torch.Generator().manual_seed(seed)
    attrs = torch.randint(0, 9, (n,), generator=gen)
    return [9 * (i % 10) + int(a) for i, a in enumerate(attrs)]
