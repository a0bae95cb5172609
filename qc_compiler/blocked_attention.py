"""Attention as two matmuls around a softmax, one cache-sized block of scores at a time.

Why: on a CPU without AMX, PyTorch's fused (flash) attention gains nothing from bf16, while oneDNN's
bf16 GEMMs run on AVX-512 BF16; so ``AttentionPrecision`` spells bf16 attention as two matmuls. Written
plainly (``softmax(q k^T) v``, :func:`plain_attention`), that form holds every score at once, and the
scores go through memory three times (the first GEMM writes them, the softmax reads and writes them, the
second GEMM reads them). At a DiT's 256 tokens (6-12 MiB of scores) that is what Inductor fuses best;
at 1024 tokens (64 MiB for 16 heads at batch 2) it is 0.69x FP32 SDPA alone, at an SD3 image's 4096
tokens (768 MiB) 0.81x: slower than the FP32 attention it replaces. Blocks of a few MiB stay in cache: whole
batch items while one item's scores fit, else whole heads of one item, else one head and a block of
query rows. Softmax runs over whole rows of keys, so no block needs another's statistics (no online
softmax, unlike flash attention), and the result is the plain form's. At those two lengths the blocks
are 1.51x and 1.58x FP32 SDPA, 2.18x and 1.95x the plain form (``benchmarks/kernel_probe.py``, Zen 4,
2 threads); in a whole DiT-S/2 forward at 1024 tokens, 1.06x the plain form and 1.32x the fused bf16
kernel (docs/RESULTS.md, "Blocked bf16 attention").

``low_precision_attention`` takes the plain form up to ``WHOLE_SCORES_MAX_MIB`` and the blocks past it.
The loop is a custom op (``qc::blocked_attention``), so ``torch.compile`` sees one opaque call and
neither unrolls the blocks (0.6 s of compile per block and call site when unrolled) nor guards on their
shape, which is chosen from the call's shapes and the thread count when it runs.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

__all__ = ["BLOCK_MIB_PER_THREAD", "WHOLE_SCORES_MAX_MIB", "block_shape", "blocked_attention", "plain_attention"]

# Up to this many MiB of scores, ``low_precision_attention`` keeps the plain form, which Inductor fuses
# (the scale into the cast before it, the softmax into one kernel) and which runs no Python loop: whole
# DiT forwards with it were 3.5-5% faster than with the blocks at 6 and 12 MiB (DiT-S/2 and DiT-B/2 at
# batch 8, one A/B each; Zen 4). Past it the blocks win: alone about 2x at 64 and 768 MiB, in a whole
# DiT-S/2 forward with 96 MiB a call 6%.
WHOLE_SCORES_MAX_MIB = 32
# The scores one block holds, per thread of the GEMMs (Zen 4 has 1 MiB of L2 a core, Sapphire Rapids 2).
# Swept at 2 threads (``kernel_probe.py --block-mib``): 2 and 4 MiB a call within 8% of each other, which
# one ahead changing between runs, at 1024 and 4096 tokens; 8 MiB 10-40% and 0.5 MiB 20-35% slower.
BLOCK_MIB_PER_THREAD = 2.0


def block_shape(items: int, heads: int, queries: int, keys: int, itemsize: int,
                budget_bytes: float) -> Tuple[int, int, int]:
    """(items, heads, query rows) of one block, an item being one index of the leading (batch) dims: as many
    whole items as ``budget_bytes`` of scores hold, else as many whole heads of one item, else one head and
    as many query rows; at least one of each, balanced so that the last block is not a sliver."""
    row = keys * itemsize
    if items * heads * queries * row == 0:  # no scores at all (an empty batch or sequence): one block
        return max(1, items), max(1, heads), max(1, queries)
    if heads * queries * row <= budget_bytes:
        return _balanced(items, int(budget_bytes // (heads * queries * row))), heads, queries
    if queries * row <= budget_bytes:
        return 1, _balanced(heads, int(budget_bytes // (queries * row))), queries
    return 1, 1, _balanced(queries, int(budget_bytes // row))


def _balanced(total: int, most: int) -> int:
    """The block length that splits ``total`` into as few blocks of at most ``most`` (at least 1) as it
    can, all of about the same length."""
    blocks = math.ceil(total / max(1, most))
    return math.ceil(total / blocks)


@torch.library.custom_op("qc::blocked_attention", mutates_args=())
def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None,
                      block_mib: Optional[float] = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` in the inputs' dtype, block by block (see module docstring).

    q is (..., heads, queries, d), k and v (..., heads, keys, d) with the same leading dims (grouped-query
    attention is SDPA's to do); ``attn_mask`` broadcasts to the scores, a bool one keeping where True, a
    float one added. ``is_causal`` keeps key j for query i where j <= i (SDPA's). ``block_mib``: the
    scores a block holds (default ``BLOCK_MIB_PER_THREAD`` per thread). A row whose keys are all masked
    gives NaN, as SDPA's math does."""
    if q.dim() < 3 or k.shape[:-2] != q.shape[:-2] or v.shape[:-1] != k.shape[:-1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"blocked_attention takes q (..., heads, queries, d) and k, v (..., heads, keys, d) with "
                         f"the same leading dims; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if block_mib is not None and not (0 < block_mib < math.inf):
        raise ValueError(f"block_mib is the MiB of scores a block holds, above 0; got {block_mib}")
    *outer, heads, queries, _ = q.shape
    keys, items = k.shape[-2], math.prod(outer)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # (items x heads) matrices: views of the inputs the pass casts into contiguous heads
    q3, k3, v3 = (t.reshape(items * heads, *t.shape[-2:]) for t in (q, k, v))
    out = q.new_empty(items * heads, queries, v.shape[-1])
    mask = _additive_mask(attn_mask, is_causal, queries, keys, q.dtype, q.device)
    if mask is not None:  # a view with zero strides where it broadcasts (a copy only with several batch dims)
        mask = mask.expand(*outer, heads, queries, keys).reshape(items, heads, queries, keys)
    budget = (torch.get_num_threads() * BLOCK_MIB_PER_THREAD if block_mib is None else block_mib) * 2 ** 20
    ib, hb, qb = block_shape(items, heads, queries, keys, q.element_size(), budget)
    zero = q.new_zeros(())  # baddbmm's input where there is no mask (beta=0 ignores it)
    for i in range(0, items, ib):
        for h in range(0, heads, hb):
            # whole items (hb == heads), or heads of one item: one run of the flattened (items x heads) axis
            flat = slice(i * heads + h, min(i + ib, items) * heads if hb == heads else i * heads + min(h + hb, heads))
            kt, vh = k3[flat].transpose(-2, -1), v3[flat]
            for r in range(0, queries, qb):
                qh = q3[flat, r:r + qb]
                # the scale applied to the GEMM's float accumulator, the mask added before the one rounding
                if mask is None:
                    scores = torch.baddbmm(zero.expand(*qh.shape[:2], keys), qh, kt, beta=0, alpha=scale)
                else:  # whole items span the mask's item axis: their block is copied whole (block-sized)
                    block = mask[i:i + ib].flatten(0, 1) if hb == heads else mask[i, h:h + hb]
                    scores = torch.baddbmm(block[:, r:r + qb], qh, kt, alpha=scale)
                # whole heads, or one head's rows: either way a contiguous run of the output
                torch.bmm(torch.softmax(scores, -1), vh, out=out[flat, r:r + qb])
    return out.reshape(*outer, heads, queries, v.shape[-1])


@blocked_attention.register_fake
def _(q, k, v, attn_mask=None, is_causal=False, scale=None, block_mib=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _save(ctx, inputs, output):
    ctx.inputs = inputs


def _backward(ctx, grad):
    """Gradients through the plain form, recomputed (a pass that trains through attention, such as block
    reconstruction, runs after ``AttentionPrecision`` as well as before it); the mask takes none."""
    q, k, v, attn_mask, is_causal, scale, _ = ctx.inputs
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = plain_attention(q, k, v, attn_mask, is_causal, scale)
        return (*torch.autograd.grad(out, (q, k, v), grad), None, None, None, None)


blocked_attention.register_autograd(_backward, setup_context=_save)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                    is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """The same attention with every score held at once, in the inputs' dtype: what ``torch.compile`` fuses
    best while the scores stay small (``WHOLE_SCORES_MAX_MIB``), and what the blocked op's gradients take."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    mask = _additive_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.dtype, q.device)
    return torch.matmul((scores if mask is None else scores + mask).softmax(-1), v)


def _additive_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, queries: int, keys: int,
                   dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """The mask as something to add to the scores (0 where kept, -inf where not), at its own broadcast shape."""
    parts: List[torch.Tensor] = []
    if attn_mask is not None:
        parts.append(attn_mask)
    if is_causal:
        parts.append(torch.ones(queries, keys, dtype=torch.bool, device=device).tril())
    if not parts:
        return None
    added = None
    for part in parts:
        if part.dtype == torch.bool:
            part = torch.zeros(part.shape, dtype=dtype, device=device).masked_fill_(part.logical_not(), float("-inf"))
        else:
            part = part.to(dtype)
        added = part if added is None else added + part
    return added
