"""Condition banks: the prompts a text-conditioned denoiser is calibrated and sampled with, by index.

A class-conditional DiT is called ``model(x, t, y)`` with integer labels, and everything that samples
(samplers, calibration pools, VC's reference runs, the static cache schedule) passes those integers
around, with label ``num_classes`` as the null (unconditional) one for classifier-free guidance.

A text-conditioned transformer (PixArt, SD3, Flux, Sana, Wan) is called with tensors instead:
``model(x, t, encoder_hidden_states, pooled_projections, ...)``. Rather than teach every sampler and
pass about tensors, a :class:`ConditionBank` holds K conditions (one row per prompt, for every input
after the timestep) plus the null condition (the negative or empty prompt's embeddings) as row K.
:meth:`ConditionBank.bind` wraps a denoiser so that it takes an index: the integer code of the rest of
the project then works unchanged, and a pool stores an index per item, not a copy of 512 x 4096 text
states.

The bank is part of what calibration depends on, so its :meth:`ConditionBank.digest` enters the
compiled model's schedule digest, and it is saved with the fitted state.

Example:
    >>> bank = ConditionBank(("encoder_hidden_states",), {"encoder_hidden_states": torch.ones(3, 4, 8)},
    ...                      null={"encoder_hidden_states": torch.zeros(4, 8)})
    >>> bank.num_conditions, bank.null_label
    (3, 3)
    >>> [tuple(t.shape) for t in bank.take(torch.tensor([0, 3]))]
    [(2, 4, 8)]
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["ConditionBank", "BankedDenoiser"]


class ConditionBank:
    """K conditions and a null one, as named tensors. ``names`` is the order the model takes them in
    (after the latent and the timestep); ``conditions[name]`` is (K, ...); ``null[name]`` is one row
    (...) or (1, ...). Without ``null``, guidance (``cfg_scale > 1``) is refused where it is needed."""

    def __init__(self, names: Sequence[str], conditions: Mapping[str, torch.Tensor],
                 null: Optional[Mapping[str, torch.Tensor]] = None):
        names = tuple(names)
        if not names:
            raise ValueError("a condition bank needs at least one input name")
        missing = [n for n in names if n not in conditions]
        extra = sorted(set(conditions) - set(names))
        if missing or extra:
            raise ValueError(f"the conditions must be exactly {list(names)}: "
                             + (f"missing {missing}" if missing else f"unknown {extra}"))
        rows = {n: torch.as_tensor(conditions[n]).detach() for n in names}
        k = {n: (t.shape[0] if t.ndim else 0) for n, t in rows.items()}
        if len(set(k.values())) != 1 or 0 in k.values():
            raise ValueError(f"every condition needs the same number (>= 1) of rows, got {k}")
        self.names, self.num_conditions, self.has_null = names, next(iter(k.values())), null is not None
        self.tensors: Dict[str, torch.Tensor] = {}
        for n, t in rows.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"condition {n!r} holds NaN or inf")
            if null is not None:
                if n not in null:
                    raise ValueError(f"null condition is missing {n!r}")
                z = torch.as_tensor(null[n]).detach().to(t.dtype)
                z = z.reshape(1, *t.shape[1:]) if z.numel() == t[0].numel() else z
                if tuple(z.shape) != (1, *t.shape[1:]):
                    raise ValueError(f"null condition {n!r} has shape {tuple(z.shape)}, want {tuple(t.shape[1:])}")
                if z.is_floating_point() and not bool(torch.isfinite(z).all()):
                    raise ValueError(f"null condition {n!r} holds NaN or inf")
            else:
                z = torch.zeros(1, *t.shape[1:], dtype=t.dtype)  # never served: take() refuses the null index
            self.tensors[n] = torch.cat([t.cpu(), z.cpu()])

    @property
    def null_label(self) -> int:
        """The index of the null condition (``num_conditions``), as a class-conditional model's null label."""
        return self.num_conditions

    def __len__(self) -> int:
        return self.num_conditions

    def take(self, y: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The condition tensors of indices ``y`` (N,), in ``names`` order, on ``y``'s device."""
        y = torch.as_tensor(y).reshape(-1).long()
        if not self.has_null and bool((y == self.null_label).any()):
            raise ValueError("guidance needs the null (negative prompt) condition: build the ConditionBank with null=")
        if bool(((y < 0) | (y > self.null_label)).any()):
            raise ValueError(f"condition indices must be in 0..{self.null_label}, got {sorted(set(y.tolist()))[:5]}")
        return tuple(self.tensors[n].index_select(0, y.cpu()).to(y.device) for n in self.names)

    def digest(self) -> str:
        h = hashlib.sha256(repr((self.names, self.has_null)).encode())
        for n in self.names:
            t = self.tensors[n].contiguous()
            h.update(f"{n}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def to_tensors(self, prefix: str = "conditions") -> Dict[str, torch.Tensor]:
        """Named tensors for safetensors (row K is the null condition)."""
        out = {f"{prefix}.{n}": t for n, t in self.tensors.items()}
        out[f"{prefix}.__meta__"] = torch.tensor([self.num_conditions, int(self.has_null)])
        return out

    @classmethod
    def from_tensors(cls, names: Sequence[str], tensors: Mapping[str, torch.Tensor],
                     prefix: str = "conditions") -> "ConditionBank":
        meta = tensors[f"{prefix}.__meta__"].tolist()
        rows = {n: tensors[f"{prefix}.{n}"] for n in names}
        k = int(meta[0])
        return cls(names, {n: t[:k] for n, t in rows.items()},
                   null={n: t[k:] for n, t in rows.items()} if meta[1] else None)

    @classmethod
    def has_tensors(cls, tensors: Mapping[str, Any], prefix: str = "conditions") -> bool:
        return f"{prefix}.__meta__" in tensors

    def like(self, examples: Sequence[torch.Tensor]) -> "ConditionBank":
        """This bank cast to the dtypes of a model's example condition inputs (a model moved to bf16)."""
        k = self.num_conditions
        cast = {n: self.tensors[n].to(e.dtype) for n, e in zip(self.names, examples)}
        return ConditionBank(self.names, {n: t[:k] for n, t in cast.items()},
                             null={n: t[k:] for n, t in cast.items()} if self.has_null else None)

    def bind(self, model: Any) -> "BankedDenoiser":
        """``model`` (called with the tensors) as a denoiser called with indices."""
        return BankedDenoiser(model, self)


class BankedDenoiser:
    """``model(x, t, *bank.take(y))`` as ``denoiser(x, t, y)``; its ``num_classes`` is the bank's size,
    so that label checks, CFG's null label and pools all count conditions. Everything else
    (``sample_shape``, ``step_hooks``, ``timestep_divisor``, ``parameters``) is the model's."""

    def __init__(self, model: Any, bank: ConditionBank):
        self.__dict__["model"], self.__dict__["bank"] = model, bank

    @property
    def num_classes(self) -> int:
        return self.bank.num_conditions

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, *self.bank.take(y.to(x.device)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.model, name, value)
