"""The PyTorch backend: lower fake-quant linears to real INT8 kernels.

Each fake-quant linear (the reference) is lowered from its ``export_spec()`` (a
:class:`~qc_compiler.quant.QuantizedLinearSpec`) to an ``Int8Linear``: int8 weights per output
channel, the activation quantized to uint8 with its calibrated per-tensor scale and zero point (per
step group where configured) or per token at run time (``act_granularity="token"``), int32
accumulation, and a fused dequantize with bias. A tanh-GELU
right after a linear (the MLP's fc1) is folded into that kernel as a post-op. A weight-only layer
(``act_bits=None``: the conditioning linears, one row per sample) becomes a ``WeightOnlyLinear``:
int8 weights and a float input, on an INT8 GEMM that reads the codes (``quant.weight_only``) where
the CPU accumulates in int32, else a float GEMM on a dequantized copy. Cache lookups, VC nodes and
anything else in the graph are left as they are. Quantized activations alone (attention-matmul operands) stay
fake-quant: PyTorch has no INT8 batched matmul on CPU worth calling.

Kernels (one small function each, picked by :func:`default_kernel`, or ``QC_INT8_KERNEL``):

| kernel | device | what it calls |
|---|---|---|
| ``onednn`` | CPU | ``torch.ops.onednn.qlinear_pointwise``: u8 x s8 -> fp32 with bias, fused |
| ``int_mm`` | CUDA, CPU | ``torch._int_mm`` (s8 x s8 -> s32), then a zero-point correction and the dequantize |
| ``fp8`` | CUDA (sm89+), CPU | ``torch._scaled_mm`` on e4m3 codes (an ``Fp8Linear``; see below) |

``fp8`` is a lowering beside INT8, not INT8: each W*A8 layer becomes an :class:`Fp8Linear`, its
weights (the spec's weight grid) re-encoded in e4m3 per output channel, its input scaled per row at
run time (row amax / 448), as torchao's float8 dynamic rowwise recipe does, so the calibrated
activation ranges go unused (e4m3 carries its own range). A layer whose sizes are not multiples of 16
(what the CUDA FP8 GEMM takes) stays on ``int_mm``, and ``report()`` says so.

On a CPU without VNNI, oneDNN's u8 x s8 GEMM saturates int16 pair sums; an 8-bit layer whose weight
codes exceed 64 then runs as two exact GEMMs (``Int8Linear.split``), slower but equal to the reference.
Activations at 7 bits (``act_bits=7``, what PyTorch's x86 ``reduce_range`` does) need no split.

oneDNN is the CPU default because the ``_int_mm`` path's separate shift, zero-point, dequantize and
bias passes cost more than the GEMM itself in a whole forward (measured: docs/RESULTS.md, "INT8
kernels and speed"; ``benchmarks/gemm_peak.py`` and ``benchmarks/profile_forward.py --kernel``).

Example:
    >>> from qc_compiler.backends import get_backend
    >>> get_backend("torch").name
    'torch'
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..diffusion.samplers import model_device
from ..errors import ExportError
from ..graph import iter_graph_modules
from ..quant.qparams import quantize_per_token
from ..quant.spec import QuantizedLinearSpec
from ..quant.weight_only import weight_only_int8_linear
from ..step import StepAware
from .registry import SATURATING_WEIGHT_CODE, cpu_has_vnni, register_backend

__all__ = ["Int8Linear", "Fp8Linear", "WeightOnlyLinear", "lower_torch", "KERNELS", "LOWERINGS", "default_kernel"]


def _quantize_u8(x: torch.Tensor, scale: float, zero: int, qmax: int) -> torch.Tensor:
    """x (M, K) float -> uint8 codes: clamp(round(x / s) + z, 0, qmax), rounding half to even.

    Exactly the reference (and onnxruntime's QuantizeLinear, which also divides): a fused
    ``quantize_per_tensor`` is faster but multiplies by 1/s, and the odd code it rounds the other
    way compounds over a sampling run. One temporary, then in-place passes.
    """
    return x.div(scale).round_().add_(zero).clamp_(0, qmax).to(torch.uint8)


def _onednn(xq: torch.Tensor, scale: float, zero: int, layer: "Int8Linear", bias: Optional[torch.Tensor]) -> torch.Tensor:
    if layer.packed is None:  # prepack once, lazily (the packed format is oneDNN's own)
        layer.packed = torch.ops.onednn.qlinear_prepack(layer.w_int8, None)
    if layer.split:  # no VNNI: codes = 2 hi + lo, each GEMM free of int16 saturation (see registry)
        lo = torch.ops.onednn.qlinear_pointwise(xq & 1, scale, zero, layer.packed, layer.w_scale, layer.w_zero, None,
                                                1.0, 0, torch.float32, "none", [], "")
        return torch.ops.onednn.qlinear_pointwise.binary(
            xq >> 1, 2.0 * scale, 0, layer.packed, layer.w_scale, layer.w_zero, lo, bias, 1.0, 0, torch.float32,
            1.0, 0, "sum", 1.0, "none", [], "")
    post, algorithm = ("gelu", "tanh") if layer.post_op == "gelu_tanh" else ("none", "")
    out_scale, out_zero, out_dtype = 1.0, 0, torch.float32
    consumer = layer.requant_consumer
    if consumer is not None:  # write the next layer's uint8 codes directly (see _fuse_requant)
        out_scale, out_zero = consumer.act_qparams()
        out_dtype = torch.uint8
    return torch.ops.onednn.qlinear_pointwise(
        xq, scale, zero, layer.packed, layer.w_scale, layer.w_zero, bias, out_scale, out_zero,
        out_dtype, post, [], algorithm)


def _int_mm(xq: torch.Tensor, scale: float, zero: int, layer: "Int8Linear", bias: Optional[torch.Tensor]) -> torch.Tensor:
    # _int_mm is signed x signed: shift u8 codes by 128. sum_k (q - z) w = sum_k (q-128) w - (z-128) sum_k w.
    xs8 = (xq.to(torch.int16) - 128).to(torch.int8)
    m = xs8.shape[0]
    if m <= 16:  # _int_mm wants more than 16 rows; pad (rows of zeros add nothing)
        xs8 = torch.cat([xs8, xs8.new_zeros(17 - m, xs8.shape[1])])
    acc = torch._int_mm(xs8, layer.w_int8.t())[:m]
    acc = acc - (zero - 128) * layer.w_sum
    out = acc.to(torch.float32) * (layer.w_scale * scale)
    out = out + bias if bias is not None else out
    return torch.nn.functional.gelu(out, approximate="tanh") if layer.post_op == "gelu_tanh" else out


KERNELS: Dict[str, Callable] = {"onednn": _onednn, "int_mm": _int_mm}
LOWERINGS = (*sorted(KERNELS), "fp8")  # what QC_INT8_KERNEL (or lower_torch's kernel) may name
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


def default_kernel(device: torch.device) -> str:
    """``QC_INT8_KERNEL`` if set; else int_mm on CUDA, onednn on CPU where it exists, int_mm otherwise."""
    chosen = os.environ.get("QC_INT8_KERNEL")
    if chosen:
        if chosen not in LOWERINGS:
            raise ValueError(f"QC_INT8_KERNEL must be one of {list(LOWERINGS)}, got {chosen!r}")
        return chosen
    if device.type == "cuda":
        return "int_mm"
    return "onednn" if hasattr(torch.ops.onednn, "qlinear_pointwise") else "int_mm"


class Int8Linear(StepAware, nn.Module):
    """A linear layer on INT8 kernels, lowered from a :class:`QuantizedLinearSpec`."""

    def __init__(self, spec: QuantizedLinearSpec, kernel: str):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown INT8 kernel {kernel!r}; known: {sorted(KERNELS)}")
        if spec.act is None:
            raise ValueError(f"{spec.path}: a weight-only layer lowers to WeightOnlyLinear, not Int8Linear")
        self.spec, self.path, self.kernel = spec, spec.path, kernel
        self.act_bits = spec.act.act_bits
        # One range for every step: a constant, read without the step state, so torch.compile traces
        # it as a constant and guards on nothing that changes per step (the inductor backend on CUDA).
        single = not spec.act.per_token and spec.act.num_groups == 1
        self.fixed_qparams = spec.act.act_qparams(0) if single else None
        self.register_buffer("w_int8", spec.codes.to(torch.int8))  # (N, K), codes in +-(2^(b-1)-1)
        self.register_buffer("w_scale", spec.w_scale.float())
        self.register_buffer("w_zero", torch.zeros_like(spec.w_scale, dtype=torch.long))
        self.register_buffer("w_sum", self.w_int8.to(torch.int32).sum(dim=1))
        # per-token inputs: the zero-point correction's row term, in the GEMM's output units (not saved)
        self.register_buffer("w_sum_scaled", self.w_sum * self.w_scale, persistent=False)
        self.bias = None if spec.bias is None else nn.Parameter(spec.bias.detach().clone(), requires_grad=False)
        self.packed = None
        # Exact on a CPU without VNNI: 8-bit activation codes times weight codes above 64 would saturate
        # oneDNN's int16 pair sums, so the activation codes are split in two GEMMs (hi: 7 bits, lo: 1 bit).
        # Never fused with a GELU or a requantization (oneDNN has no GELU after a sum post-op).
        self.split = (kernel == "onednn" and self.act_bits == 8 and not cpu_has_vnni()
                      and int(self.w_int8.abs().max()) > SATURATING_WEIGHT_CODE)
        self.post_op = "none"  # "gelu_tanh" when lowering folded the following GELU into the kernel
        # The next Int8Linear, when this layer writes its input codes (fc1 -> fc2). Kept out of
        # the module tree: it is a pointer to a sibling, not a child.
        self.__dict__["requant_consumer"] = None

    def export_spec(self) -> QuantizedLinearSpec:
        return replace(self.spec, post_op=self.post_op)

    @property
    def uses_step(self) -> bool:
        return self.spec.act.num_groups > 1 and not self.spec.act.per_token

    def act_qparams(self) -> Tuple[float, int]:
        """This step's activation scale and zero point (per step group where calibrated so)."""
        if self.fixed_qparams is not None:
            return self.fixed_qparams
        return self.spec.act.act_qparams(self.step_state.step if self.step_state is not None else -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        if self.spec.act.per_token:
            out = self._per_token(x.reshape(-1, k))
        else:
            out = self._per_tensor(x, k)
        if self.spec.low_rank is not None:  # SVDQuant's float branch on the raw input (never fused, below)
            up, down = self.spec.low_rank
            xf = x.reshape(-1, k).to(up.dtype)
            out = out + torch.nn.functional.linear(torch.nn.functional.linear(xf, down), up)
        out = out.reshape(*lead, -1)
        return out if out.dtype == torch.uint8 else out.to(torch.float32 if x.dtype == torch.uint8 else x.dtype)

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's own scale s and zero point z (the reference's rule): the GEMM runs on the codes at
        unit scale, then s (acc - z sum_k w) + b per row. Never fused with a GELU or a requantization."""
        channel = self.spec.act.channel_scale
        xs = x.float() if channel is None else x.float() / channel
        codes, scale, zero = quantize_per_token(xs, self.act_bits)
        acc = KERNELS[self.kernel](codes.to(torch.uint8), 1.0, 0, self, None)  # (M, N): sum_k q w w_scale
        acc.addr_(zero.squeeze(1), self.w_sum_scaled, alpha=-1.0).mul_(scale)
        return acc.add_(self.bias) if self.bias is not None else acc

    def _per_tensor(self, x: torch.Tensor, k: int) -> torch.Tensor:
        scale, zero = self.act_qparams()
        if x.dtype == torch.uint8:  # already this layer's codes, written by the layer before
            xq = x.reshape(-1, k)
        else:
            channel = self.spec.act.channel_scale  # balanced: round(x / (s a)) + z, same pass, a vector scale
            qscale = scale if channel is None else channel * scale
            xq = _quantize_u8(x.reshape(-1, k).float(), qscale, zero, 2 ** self.act_bits - 1)  # (M, K) u8
        return KERNELS[self.kernel](xq, scale, zero, self, self.bias)  # (M, N) float32, or u8 codes for the consumer

    def report_section(self) -> str:
        fused = ", split for no VNNI" if self.split else ""
        fused += ", per-token activations" if self.spec.act.per_token else ""
        fused += " + GELU" if self.post_op == "gelu_tanh" else ""
        fused += f" -> u8 for {self.requant_consumer.path}" if self.requant_consumer is not None else ""
        return f"  {self.path:<30} INT8 ({self.kernel}{fused}) W{self.spec.weight_bits}A{self.act_bits}"


_ROWWISE: Dict[str, bool] = {}


def fp8_rowwise_supported(device: torch.device) -> bool:
    """Whether this torch's ``_scaled_mm`` takes per-row scales on ``device`` (CUDA sm89+; the CPU from
    torch 2.13; torch 2.11's CPU kernel takes per-tensor scales only). Asked once per device type."""
    if device.type not in _ROWWISE:
        try:
            a = torch.zeros(16, 16, device=device).to(torch.float8_e4m3fn)
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device),
                             scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
            _ROWWISE[device.type] = True
        except (RuntimeError, AttributeError, TypeError):
            _ROWWISE[device.type] = False
    return _ROWWISE[device.type]


def fp8_shapes_ok(spec: QuantizedLinearSpec) -> bool:
    """The CUDA FP8 GEMM takes K and N in multiples of 16."""
    n, k = spec.codes.shape
    return n % 16 == 0 and k % 16 == 0


class Fp8Linear(nn.Module):
    """A linear on ``torch._scaled_mm`` in float8 e4m3: per-output-channel weight scales, per-row input
    scales taken at run time, bf16 output, then the bias (see the module docstring). A NaN in a row
    makes that row's scale NaN, so NaN comes out, as in FP32."""

    def __init__(self, spec: QuantizedLinearSpec):
        super().__init__()
        if spec.act is None or spec.act.act_bits != 8:
            raise ValueError(f"{spec.path}: the fp8 lowering takes W*A8 layers with a quantized input")
        self.spec, self.path = spec, spec.path
        w = spec.codes.float() * spec.w_scale.float()[:, None]  # the spec's weight grid, (N, K)
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX
        self.register_buffer("w_fp8", (w / scale[:, None]).to(torch.float8_e4m3fn))
        self.register_buffer("w_scale", scale[None, :].contiguous())  # (1, N), as _scaled_mm takes it
        self.bias = None if spec.bias is None else nn.Parameter(spec.bias.detach().clone(), requires_grad=False)

    def export_spec(self) -> QuantizedLinearSpec:
        return self.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, k).float()
        scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX  # (M, 1)
        codes = (xf / scale).to(torch.float8_e4m3fn)
        m = codes.shape[0]
        if m % 16:  # the CUDA FP8 GEMM takes rows in multiples of 16: pad (zero rows add nothing)
            pad = 16 - m % 16
            codes, scale = torch.cat([codes, codes.new_zeros(pad, k)]), torch.cat([scale, scale.new_ones(pad, 1)])
        out = torch._scaled_mm(codes, self.w_fp8.t(), scale_a=scale, scale_b=self.w_scale, out_dtype=torch.bfloat16)[:m]
        out = out.float() if self.bias is None else out.float() + self.bias.float()
        if self.spec.low_rank is not None:  # SVDQuant's float branch, as Int8Linear runs it
            up, down = self.spec.low_rank
            out = out + torch.nn.functional.linear(torch.nn.functional.linear(xf.to(up.dtype), down), up)
        return out.reshape(*lead, -1).to(x.dtype)

    def report_section(self) -> str:
        return f"  {self.path:<30} FP8 e4m3 (torch._scaled_mm, per-row input scales) from W{self.spec.weight_bits}"


class WeightOnlyLinear(nn.Module):
    """A linear with int8 weights (per output channel) and a float input.

    On a CPU whose INT8 GEMM accumulates in int32 (VNNI, AMX) the GEMM reads the int8 codes:
    :func:`qc_compiler.quant.weight_only.weight_only_int8_linear`, the input written exactly as three
    int8 rows (to float32's precision). These layers run on one row per sample, where a GEMM is bound by
    reading its weight, so one byte a weight instead of four is the speed (DiT-B/2's twelve adaLN layers,
    eager: 17.1 ms a forward as float GEMMs, 8.6 ms so; ``benchmarks/kernel_probe.py``). Elsewhere (no VNNI,
    CUDA, a low-rank branch), a dequantized float copy made on first use (like oneDNN's prepacked
    weights): re-dequantizing at each call would cost more than the GEMM."""

    def __init__(self, spec: QuantizedLinearSpec):
        super().__init__()
        self.spec, self.path = spec, spec.path
        self.register_buffer("w_int8", spec.codes.to(torch.int8))
        self.register_buffer("w_scale", spec.w_scale.float())
        self.bias = None if spec.bias is None else nn.Parameter(spec.bias.detach().clone(), requires_grad=False)
        self.dequantized = None
        self.int8_gemm = spec.low_rank is None and cpu_has_vnni()  # on the CPU (checked per call)

    def export_spec(self) -> QuantizedLinearSpec:
        return self.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_gemm and x.device.type == "cpu":
            return weight_only_int8_linear(x, self.w_int8.t(), self.w_scale, self.bias)
        w = self.dequantized
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.w_int8.float() * self.w_scale[:, None]
            if self.spec.low_rank is not None:  # a float input: the low-rank branch folds into the weight
                up, down = self.spec.low_rank
                w = w + up.float() @ down.float()
            w = self.dequantized = w.to(device=x.device, dtype=x.dtype)
        return torch.nn.functional.linear(x, w, self.bias)

    def report_section(self) -> str:
        gemm = "INT8 GEMM on the codes" if self.int8_gemm else "float GEMM"
        return f"  {self.path:<30} weight-only: W{self.spec.weight_bits} codes in int8, float input ({gemm})"


def check_torch_kernel(passes) -> None:
    """Before any pass runs: a ``QC_INT8_KERNEL`` this backend does not know, or ``fp8`` where no device
    here can run it (no CUDA, and a CPU ``_scaled_mm`` without per-row scales), is refused."""
    chosen = os.environ.get("QC_INT8_KERNEL")
    if chosen and chosen not in LOWERINGS:
        raise ExportError(f"QC_INT8_KERNEL must be one of {list(LOWERINGS)}, got {chosen!r}")
    if chosen == "fp8" and not torch.cuda.is_available() and not fp8_rowwise_supported(torch.device("cpu")):
        raise _no_fp8("on a GPU or the CPU")


def _no_fp8(where: str) -> ExportError:
    return ExportError(f"QC_INT8_KERNEL=fp8 needs torch._scaled_mm with per-row scales {where}, which this torch "
                       f"({torch.__version__}) lacks: use a CUDA GPU of compute capability 8.9+ or torch>=2.13 on the "
                       "CPU, or another QC_INT8_KERNEL")


@register_backend("torch", check=check_torch_kernel)
def lower_torch(gm: fx.GraphModule, ctx, kernel: Optional[str] = None) -> nn.Module:
    """Swap every fake-quant linear (in the graph and in nested region graphs) for an Int8Linear, or a
    WeightOnlyLinear where its input is not quantized, built from its ``export_spec()``. ``kernel="fp8"``
    lowers the W*A8 layers to Fp8Linear instead (those whose sizes the FP8 GEMM takes)."""
    device = model_device(gm)
    kernel = kernel or default_kernel(device)
    if kernel not in LOWERINGS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {list(LOWERINGS)}")
    if kernel == "fp8" and not fp8_rowwise_supported(device):
        raise _no_fp8(f"on {device.type}")
    for name, module in list(gm.named_modules()):
        if isinstance(module, (Int8Linear, Fp8Linear, WeightOnlyLinear)) or not hasattr(module, "export_spec"):
            continue
        spec = module.export_spec()
        if not isinstance(spec, QuantizedLinearSpec):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        if spec.weight_only:
            lowered = WeightOnlyLinear(spec)
        elif kernel == "fp8" and spec.act.act_bits == 8 and fp8_shapes_ok(spec):
            lowered = Fp8Linear(spec)
        else:  # fp8 asked, but activation bits or sizes it cannot take: INT8 on _int_mm
            lowered = Int8Linear(spec, "int_mm" if kernel == "fp8" else kernel)
        setattr(parent, child, lowered)  # buffers are on the spec's device
    for _, graph_module in iter_graph_modules(gm):
        _fuse_gelu(graph_module)
        _fuse_requant(graph_module)
    return gm


def _is_tanh_gelu(owner: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = owner.get_submodule(node.target)
        return isinstance(mod, nn.GELU) and mod.approximate == "tanh"
    if node.op == "call_function" and node.target in (torch.nn.functional.gelu, torch.ops.aten.gelu.default):
        return node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "tanh"
    return False


def _fuse_gelu(owner: fx.GraphModule) -> None:
    """linear -> GELU(tanh) becomes one INT8 kernel with a GELU post-op (the MLP's fc1), saving a pass
    over the widest activation of the block."""
    changed = False
    for node in list(owner.graph.nodes):
        if node.op != "call_module" or not isinstance(owner.get_submodule(node.target), Int8Linear):
            continue
        users = list(node.users)
        layer = owner.get_submodule(node.target)
        # the branch/sum/per-token rescale come before the GELU
        unfusable = layer.spec.low_rank is not None or layer.split or layer.spec.act.per_token
        if len(users) == 1 and not unfusable and _is_tanh_gelu(owner, users[0]):
            owner.get_submodule(node.target).post_op = "gelu_tanh"
            users[0].replace_all_uses_with(node)
            owner.graph.erase_node(users[0])
            changed = True
    if changed:
        owner.graph.lint()
        owner.recompile()


def _fuse_requant(owner: fx.GraphModule) -> None:
    """Int8Linear -> Int8Linear (fc1 -> fc2 once the GELU is folded): the first kernel writes uint8
    codes in the second's activation scale, so the widest activation of the block is never stored in
    float nor quantized by a separate pass. oneDNN's requantization rounds to nearest even, as the
    reference does. Only the oneDNN kernel has an output-quantization epilogue, and it clamps to
    0..255, so the consumer must take 8-bit activations."""
    for node in owner.graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        producer, user = owner.get_submodule(node.target), next(iter(node.users))
        if (not isinstance(producer, Int8Linear) or producer.kernel != "onednn" or user.op != "call_module"
                or producer.spec.low_rank is not None or producer.split or producer.spec.act.per_token):
            continue
        consumer = owner.get_submodule(user.target)
        if (isinstance(consumer, Int8Linear) and consumer.kernel == "onednn" and consumer.act_bits == 8
                and consumer.spec.act.channel_scale is None and consumer.spec.low_rank is None
                and not consumer.spec.act.per_token
                and user.args[:1] == (node,)):
            producer.__dict__["requant_consumer"] = consumer


@register_backend("fakequant")
def lower_fakequant(gm: fx.GraphModule, ctx) -> nn.Module:
    """No lowering: run the fake-quant reference graph as it is (for parity tests and debugging)."""
    return gm
