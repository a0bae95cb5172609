"""Models and their adapters: the reference DiT, the zoo, and one adapter per family.

Example:
    >>> from qc_compiler.models import ADAPTERS
    >>> {"dit", "diffusers-dit"} <= set(ADAPTERS)
    True
"""
from . import adapters  # noqa: F401  (registers every family)
from .adapter import (ADAPTERS, ForwardInputs, Geometry, ModelAdapter, ModelInfo, adapter_for, adapter_of, get_adapter, known_classes,
                      register_adapter)

__all__ = ["ADAPTERS", "ForwardInputs", "Geometry", "ModelAdapter", "ModelInfo", "adapter_for", "adapter_of", "get_adapter", "known_classes",
           "register_adapter"]
