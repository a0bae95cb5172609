"""Prompts for digits: the words, the attributes they name, and the small text encoder of ``mmdit-mnist``.

``mmdit-mnist`` is diffusers' ``SD3Transformer2DModel`` trained here on MNIST with prompts such as
"a thick right-slanted seven". The prompts mean something measurable: each word names either the
digit or an attribute measured from the training image itself,

* **thickness**: ink mass, the mean brightness of the digit's pixels (stroke width times length);
* **slant**: the shear of the intensity-weighted second moments, ``-mu11 / mu02`` (positive when the
  top of the digit leans right; the quantity classic MNIST deskewing removes).

Thresholds are per digit (a one is always thinner than an eight): "thin" is the lightest third of the
training images of that digit, "thick" the heaviest third, "left-slanted" and "right-slanted" the
outer thirds of the shear. The middle third gets no word. The thresholds ship with the model, so a
sample's attributes can be checked against its prompt (:func:`attribute_accuracy`).

The text encoder is deliberately small and trained with the transformer: a word-level vocabulary, a
learned embedding per word and per position, and one LayerNorm. It hands the transformer what the
real SD3 pipeline's three encoders hand it: ``encoder_hidden_states`` (B, tokens, width) and
``pooled_projections`` (B, width), the mean of the prompt's word embeddings. The empty prompt is the
unconditional one for classifier-free guidance (all padding, pooled zeros).

Example:
    >>> tokenize(["a thick, right-slanted seven", ""]).tolist()
    [[1, 4, 8, 5, 16, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]
    >>> parse_prompt("a thin left-slanted two")
    (2, -1, -1)
    >>> describe(7, thickness=1, slant=0)
    'a thick seven'
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["DIGITS", "VOCAB", "MAX_TOKENS", "tokenize", "parse_prompt", "describe", "DigitTextEncoder",
           "measure_attributes", "AttributeThresholds", "attribute_accuracy"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# index 0 pads; "an" is accepted so "an eight" reads right
VOCAB = ("<pad>", "a", "an", "thin", "thick", "slanted", "left", "upright", "right") + DIGITS
MAX_TOKENS = 8
_INDEX = {w: i for i, w in enumerate(VOCAB)}
_WORD = re.compile(r"[a-z]+")


def _words(prompt: str) -> List[str]:
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt is a string, got {type(prompt).__name__}")
    words = _WORD.findall(prompt.lower())
    if _WORD.sub("", prompt.lower()).strip(" ,.-"):
        raise ValueError(f"prompt {prompt!r} has characters other than words, spaces, commas, hyphens and dots")
    unknown = [w for w in words if w not in _INDEX or w == "<pad>"]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: unknown word {unknown[0]!r}; the words are "
                         f"{', '.join(VOCAB[1:])}")
    if len(words) > MAX_TOKENS:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {MAX_TOKENS}")
    return words


def tokenize(prompts: Sequence[str]) -> torch.Tensor:
    """Word indices (B, MAX_TOKENS), padded with 0. Unknown words and long prompts raise ``ValueError``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [_INDEX[w] for w in _words(p)]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def parse_prompt(prompt: str) -> Tuple[Optional[int], int, int]:
    """(digit or None, thickness, slant) named by a prompt: thickness -1 thin, +1 thick, 0 unnamed;
    slant -1 left, +1 right, 0 upright or unnamed. Contradictions ("thin thick") raise."""
    words = _words(prompt)
    digits = [DIGITS.index(w) for w in words if w in DIGITS]
    if len(set(digits)) > 1:
        raise ValueError(f"prompt {prompt!r} names more than one digit")
    if "thin" in words and "thick" in words:
        raise ValueError(f"prompt {prompt!r} is both thin and thick")
    sides = {w for w in words if w in ("left", "right", "upright")}
    if len(sides) > 1:
        raise ValueError(f"prompt {prompt!r} names more than one slant")
    thickness = -1 if "thin" in words else 1 if "thick" in words else 0
    slant = -1 if "left" in sides else 1 if "right" in sides else 0
    return (digits[0] if digits else None), thickness, slant


def describe(digit: int, thickness: int = 0, slant: int = 0) -> str:
    """The prompt for a digit with attributes (-1, 0, +1 as :func:`parse_prompt` returns them)."""
    words = ["thin" if thickness < 0 else "thick" if thickness > 0 else "",
             "left-slanted" if slant < 0 else "right-slanted" if slant > 0 else "", DIGITS[digit]]
    body = " ".join(w for w in words if w)
    return ("an " if body[0] in "aeiou" else "a ") + body


class DigitTextEncoder(nn.Module):
    """Word and position embeddings and a LayerNorm: ``(tokens) -> (encoder_hidden_states, pooled)``.

    The pooled vector is the mean of the prompt's word embeddings (before positions), zero for the empty
    prompt; the transformer's own pooled-text MLP (``time_text_embed``) takes it from there."""

    def __init__(self, width: int = 64, vocab: int = len(VOCAB), tokens: int = MAX_TOKENS):
        super().__init__()
        self.config = {"width": width, "vocab": vocab, "tokens": tokens}
        self.words = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.zeros(tokens, width))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.words.weight, std=0.5)
        nn.init.normal_(self.positions, std=0.1)

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        emb = self.words(tokens)
        real = (tokens != 0).unsqueeze(-1).to(emb.dtype)
        pooled = (emb * real).sum(1) / real.sum(1).clamp(min=1.0)
        return self.norm(emb + self.positions), pooled

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The pipeline's keyword arguments for these prompts: ``prompt_embeds`` and ``pooled_prompt_embeds``."""
        hidden, pooled = self(tokenize(prompts).to(self.positions.device))
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}


def measure_attributes(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ink, slant) of images in [-1, 1], (N, 1, H, W): ink is the mean brightness in [0, 1]; slant is
    ``-mu11 / mu02`` of the brightness-weighted pixel coordinates (rows grow downwards, so a digit whose
    top leans right has a positive slant)."""
    w = ((images.float().clamp(-1, 1) + 1) / 2).flatten(1)  # (N, H*W)
    h, wd = images.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(wd, dtype=torch.float32), indexing="ij")
    ys, xs = ys.reshape(1, -1), xs.reshape(1, -1)
    mass = w.sum(1).clamp(min=1e-6)
    cy, cx = (w * ys).sum(1) / mass, (w * xs).sum(1) / mass
    dy, dx = ys - cy[:, None], xs - cx[:, None]
    mu11, mu02 = (w * dx * dy).sum(1) / mass, (w * dy * dy).sum(1) / mass
    return w.mean(1), -mu11 / mu02.clamp(min=1e-6)


class AttributeThresholds:
    """Per-digit terciles and medians of ink and slant over the training images.

    ``bins(images, labels)`` gives each image's thickness and slant (-1 lower third, 0 middle, +1 upper
    third); ``side(images, labels)`` gives which side of the digit's median each lies on (-1 or +1),
    which is how a sample prompted "thick" is judged."""

    def __init__(self, table: torch.Tensor):
        table = torch.as_tensor(table, dtype=torch.float32)
        if table.shape != (len(DIGITS), 2, 3):
            raise ValueError(f"attribute thresholds are (10, 2, 3) (digit, ink/slant, lower/median/upper), "
                             f"got {tuple(table.shape)}")
        self.table = table

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor) -> "AttributeThresholds":
        ink, slant = measure_attributes(images)
        q = torch.tensor([1 / 3, 0.5, 2 / 3])
        rows = []
        for d in range(len(DIGITS)):
            sel = labels == d
            if not bool(sel.any()):
                raise ValueError(f"no images of digit {d} to fit its attribute thresholds")
            rows.append(torch.stack([torch.quantile(ink[sel], q), torch.quantile(slant[sel], q)]))
        return cls(torch.stack(rows))

    def bins(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        values = torch.stack(measure_attributes(images), 1)  # (N, 2)
        t = self.table[labels.long()]  # (N, 2, 3)
        return tuple(((values > t[..., 2]).long() - (values < t[..., 0]).long()).unbind(1))

    def side(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        values = torch.stack(measure_attributes(images), 1)
        med = self.table[labels.long()][..., 1]
        return tuple(torch.where(values > med, 1, -1).unbind(1))


def attribute_accuracy(images: torch.Tensor, prompts: Sequence[str], thresholds: AttributeThresholds) -> Dict[str, float]:
    """How often a sample's measured attributes agree with its prompt: for each prompt that names a
    thickness (slant), the sample must lie on that side of the prompted digit's training median.
    Returns ``thickness``, ``slant`` and ``attributes`` (both pooled), with the counts judged."""
    parsed = [parse_prompt(p) for p in prompts]
    if any(d is None for d, _, _ in parsed):
        raise ValueError("every prompt must name a digit to judge its attributes")
    labels = torch.tensor([d for d, _, _ in parsed])
    wanted = torch.tensor([[th, sl] for _, th, sl in parsed])
    got = torch.stack(thresholds.side(images, labels), 1)
    named = wanted != 0
    hits = (got == wanted) & named
    out: Dict[str, float] = {}
    for j, name in enumerate(("thickness", "slant")):
        n = int(named[:, j].sum())
        out[name] = float(hits[:, j].sum()) / n if n else float("nan")
        out[f"{name}_n"] = n
    total = int(named.sum())
    out["attributes"] = float(hits.sum()) / total if total else float("nan")
    return out
