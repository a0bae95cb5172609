"""One typed error per failure mode, all under ``QCError``.

Example:
    >>> try:
    ...     raise PassOrderError("Quantize needs 'calibration_set'")
    ... except QCError as e:
    ...     print(type(e).__name__)
    PassOrderError
"""
from __future__ import annotations

__all__ = [
    "QCError", "CaptureError", "PassOrderError", "PassError", "CalibrationError", "ExportError",
    "ArtifactError", "ArtifactNotFoundError", "RefusedAttributeError", "StepError",
]


class QCError(Exception):
    """Root of every error qc-compiler raises on purpose."""


class CaptureError(QCError):
    """The model could not be turned into an fx graph."""


class PassOrderError(QCError):
    """A pass needs an artefact that no earlier pass provides."""


class PassError(QCError):
    """A pass failed while running; names the pass and, where known, the node."""

    def __init__(self, pass_name: str, message: str, node: str | None = None):
        where = f" at node {node!r}" if node else ""
        super().__init__(f"pass {pass_name!r}{where}: {message}")
        self.pass_name = pass_name
        self.node = node


class CalibrationError(QCError):
    """Calibration data is missing or unusable (NaN, inf, empty)."""


class ExportError(QCError):
    """Lowering or exporting to a backend failed."""


class ArtifactError(QCError):
    """A file the project reads is missing, truncated, tampered with, or of the wrong version."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """The artefact is not there at all; an ``OSError`` too, as diffusers' loaders raise for a missing file."""


class RefusedAttributeError(QCError, AttributeError):
    """An attribute a compiled model deliberately does not have (``hasattr`` is False; reading it says why)."""


class StepError(QCError):
    """A compiled model was called at a timestep its schedule does not know."""
