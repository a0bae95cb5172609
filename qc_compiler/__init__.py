"""qc-compiler: compile Diffusion Transformers with quantization, step caching and variance compensation.

Example:
    >>> import qc_compiler as qc
    >>> model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    >>> fast = qc.compile(model, passes=[], sampler=qc.DDPM(steps=5))
    >>> qc.DDPM(steps=5).sample(fast, labels=[3], seed=0).shape
    torch.Size([1, 1, 16, 16])
"""
from . import backends, passes, presets  # noqa: F401  (importing them registers passes and backends)
from .api import bind_pipeline, compile, compile_pipeline, load_compiled, load_model
from .capture import capture
from .diffusion import DDIM, DDPM, ConditionBank, FlowMatchEuler, PipelineSampler
from .errors import (ArtifactError, CalibrationError, CaptureError, ExportError, PassError, PassOrderError, QCError,
                     StepError)
from .models import ModelAdapter, ModelInfo, adapter_for, register_adapter
from .pipeline import Pass, PassContext, PassManager, PassResult, graph_pass, register_pass
from .runtime import CompiledModel
from .schedules import CompiledSchedules
from .sensitivity import MixedPrecision, mixed_precision
from .step import StepTable
from .tune import Candidate, QuantChoice, TuneResult, TuneSpace, tune

__version__ = "0.2.0"

__all__ = [
    "MixedPrecision", "mixed_precision", "tune", "TuneSpace", "TuneResult", "Candidate", "QuantChoice",
    "compile", "compile_pipeline", "bind_pipeline", "load_model", "load_compiled", "capture",
    "DDPM", "DDIM", "FlowMatchEuler", "PipelineSampler", "ConditionBank", "CompiledModel", "CompiledSchedules",
    "StepTable", "ModelAdapter", "ModelInfo", "adapter_for", "register_adapter",
    "Pass", "PassResult", "PassContext", "PassManager", "graph_pass", "register_pass",
    "QCError", "CaptureError", "PassOrderError", "PassError", "CalibrationError", "ExportError",
    "ArtifactError", "StepError",
]
