"""The compiled baselines every speed table is measured against: PyTorch's own fastest CPU paths.

- ``torch.compile`` FP32 and bf16 autocast, with Inductor's ``freezing`` on (weights become
  constants, prepacked for oneDNN: what the PyTorch CPU inference tutorials set);
- torchao's PT2E static INT8: ``torch.export``, ``X86InductorQuantizer`` (its default config:
  per-channel symmetric weights, per-tensor affine activations), calibrated on the batches given,
  ``convert_pt2e``, then ``torch.compile`` with freezing, which fuses the quantize/dequantize pairs
  into oneDNN INT8 kernels (AMX where the CPU has it);
- torchao's dynamic INT8 (``Int8DynamicActivationInt8WeightConfig``) + ``torch.compile``.

Each builder returns a :class:`Baseline`: the callable, and the seconds its first call took (the
compile). torchao is optional (the ``bench`` extra); without it those rows say so.

Example:
    >>> from qc_compiler.models.dit import DiT_models
    >>> m = DiT_models["DiT-T/4"](input_size=16, in_channels=1, num_classes=10).eval()
    >>> x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 5]), torch.tensor([1, 2])
    >>> b = eager_bf16(m, (x, t, y))
    >>> b.fn(x, t, y).shape
    torch.Size([2, 2, 16, 16])
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..backends.inductor import freezing

__all__ = ["Baseline", "eager_bf16", "compiled", "pt2e_int8", "torchao_dynamic_int8", "freezing"]

Inputs = Tuple[torch.Tensor, ...]


@dataclass
class Baseline:
    """A row: ``fn(*inputs)``, and the first call's seconds (compile plus one forward; 0 for eager)."""

    label: str
    fn: Callable[..., torch.Tensor]
    first_call_s: float = 0.0


def _timed_first_call(label: str, fn: Callable, inputs: Inputs) -> Baseline:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*inputs)
    return Baseline(label, fn, time.perf_counter() - t0)


def _autocast(fn: Callable, dtype: Optional[torch.dtype]) -> Callable:
    if dtype is None:
        return fn

    def run(*args: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype):
            return fn(*args)

    return run


def eager_bf16(model: nn.Module, inputs: Inputs) -> Baseline:
    """Eager bf16 autocast (no compile)."""
    return Baseline("PyTorch eager bf16 autocast", _autocast(model, torch.bfloat16))


PT2E = "torchao PT2E X86InductorQuantizer static INT8 + torch.compile"  # its rows' label


def compiled(model: nn.Module, inputs: Inputs, dtype: Optional[torch.dtype] = None) -> Baseline:
    """``torch.compile`` (Inductor, freezing on) of ``model``, under ``dtype`` autocast when given."""
    with freezing():
        fn = torch.compile(_autocast(model, dtype), dynamic=False)
        name = "bf16 autocast" if dtype == torch.bfloat16 else "FP32" if dtype is None else str(dtype)
        return _timed_first_call(f"torch.compile {name}", fn, inputs)


def pt2e_int8(model: nn.Module, inputs: Inputs, calibration: Iterable[Inputs],
              keep_float: Sequence[str] = ()) -> Baseline:
    """torchao PT2E static INT8 (X86InductorQuantizer) calibrated on ``calibration``, then compiled.
    ``keep_float``: names of Linear modules left in float (ours keeps the embedders float and the
    conditioning linears weight-only; given them, PT2E quantizes the same GEMMs as ours)."""
    converted = pt2e_convert(model, inputs, calibration, keep_float)
    with freezing():
        fn = torch.compile(converted, dynamic=False)
        return _timed_first_call(PT2E + (", our layers" if keep_float else ""), fn, inputs)


def pt2e_convert(model: nn.Module, inputs: Inputs, calibration: Iterable[Inputs],
                 keep_float: Sequence[str] = ()) -> torch.fx.GraphModule:
    """PT2E's converted graph (quantize/dequantize nodes around the layers it quantized), checked to
    quantize something (:func:`check_quantized`).

    The graph is exported at the inputs' batch size, so the calibration items are re-batched to it
    (the remainder is left out; fewer items than one batch are repeated to fill it)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    for name in keep_float:
        quantizer.set_module_name_qconfig(name, None)
    with torch.no_grad():
        graph = torch.export.export(copy.deepcopy(model).eval(), tuple(inputs)).module()
        prepared = prepare_pt2e(graph, quantizer)
        for batch in _rebatch(calibration, inputs):
            prepared(*batch)
        converted = convert_pt2e(prepared)
    check_quantized(converted, "PT2E (X86InductorQuantizer)")
    return converted


def check_quantized(gm: torch.fx.GraphModule, what: str) -> int:
    """The number of activation quantize nodes in a converted PT2E graph; none raises. A quantizer whose
    patterns match nothing in the exported graph (seen: torchao 0.18 on torch 2.11, every row's error equal to
    compiled FP32's) leaves a float model, and a table would time it as the INT8 baseline."""
    n = sum(1 for node in gm.graph.nodes if node.op == "call_function"
            and str(node.target).split(".")[-2:-1] == ["quantize_per_tensor"])
    if not n:
        import importlib.metadata as md

        try:
            ao = md.version("torchao")
        except md.PackageNotFoundError:
            ao = "not installed"
        raise RuntimeError(f"{what} quantized no activation (torch {torch.__version__}, torchao {ao}): "
                           "it matched nothing in the exported graph, so this row would time a float model")
    return n


def _rebatch(calibration: Iterable[Inputs], inputs: Inputs) -> List[Inputs]:
    """The calibration items in batches of the inputs' size and dtypes (a static export takes no other)."""
    parts = list(zip(*calibration))
    if not parts:
        raise ValueError("PT2E needs calibration batches")
    whole = [torch.cat(p).to(like.dtype) for p, like in zip(parts, inputs)]
    n, b = whole[0].shape[0], inputs[0].shape[0]
    if n < b:  # fewer items than one batch: repeat them (a range or histogram observer sees the same values)
        whole = [w.repeat(-(-b // n), *([1] * (w.dim() - 1))) for w in whole]
        n = whole[0].shape[0]
    return [tuple(w[i:i + b] for w in whole) for i in range(0, n - b + 1, b)]


def torchao_dynamic_int8(model: nn.Module, inputs: Inputs) -> Baseline:
    """torchao's dynamic INT8 (per-token activations, per-channel weights) on every Linear, compiled."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(model).eval()
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    with freezing():
        fn = torch.compile(quantized, dynamic=False)
        return _timed_first_call("torchao dynamic INT8 + torch.compile", fn, inputs)


def build_all(model: nn.Module, inputs: Inputs,
              calibration: Union[Sequence[Inputs], Callable[[], Sequence[Inputs]]], keep_float: Sequence[str] = (),
              only: Optional[Callable[[str], bool]] = None) -> Tuple[list, list]:
    """(baselines, failures): every compiled baseline that builds here, and a line for each that does
    not (torchao missing, an export the model refuses), so a table never silently drops a row. PT2E
    runs twice: quantizing every Linear (the tutorial's way), and leaving ``keep_float`` in float.
    ``calibration``: PT2E's batches, or a function that makes them (called only when PT2E is built).
    ``only``, when given, picks the baselines to build by their row label (each compiles for minutes)."""
    batches = calibration if callable(calibration) else lambda: calibration
    rows, failed = [], []
    # the strongest baselines first (the ones the speed goals name), for a caller that stops early
    for label, build in (("torch.compile bf16 autocast", lambda: compiled(model, inputs, torch.bfloat16)),
                         (PT2E, lambda: pt2e_int8(model, inputs, batches())),
                         (f"{PT2E}, our layers", lambda: pt2e_int8(model, inputs, batches(), keep_float)),
                         ("torch.compile FP32", lambda: compiled(model, inputs)),
                         ("torchao dynamic INT8 + torch.compile", lambda: torchao_dynamic_int8(model, inputs))):
        if only is not None and not only(label):
            continue
        try:
            rows.append(build())
        except Exception as e:  # noqa: BLE001 - reported as the row's reason, never hidden
            first = str(e).splitlines()[0][:100] if str(e) else ""
            failed.append(f"{label} failed: {type(e).__name__}: {first}")
    return rows, failed
