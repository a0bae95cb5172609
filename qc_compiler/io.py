"""Atomic, pickle-free artefact files: safetensors for tensors, JSON for everything else.

Every write goes to a temporary file in the same folder and is renamed into place, so a crash never
leaves a half-written artefact. Every read turns a truncated or tampered file into ``ArtifactError``.

Example:
    >>> import tempfile, torch
    >>> d = Path(tempfile.mkdtemp())
    >>> save_tensors({"w": torch.ones(2)}, d / "w.safetensors", metadata={"kind": "test"})
    >>> load_tensors(d / "w.safetensors")[0]["w"]
    tensor([1., 1.])
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ArtifactError

__all__ = ["sha256_file", "atomic_write_bytes", "save_json", "load_json", "save_tensors", "load_tensors",
           "tensor_digest", "check_output_file", "check_finite"]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order): a content identity
    that does not depend on where the tensors came from."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """``ArtifactError`` naming the first tensor that holds NaN or inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{what}: {name} holds NaN or inf; a model with non-finite weights samples garbage")


def check_output_file(path, what: str = "output") -> Path:
    """Refuse, before any work, a file path that cannot be written: empty, a folder, under a file, or
    in a folder that is not writable. Missing parent folders are fine (they are created)."""
    if path is None or str(path).strip() in ("", "."):
        raise ArtifactError(f"the {what} path is empty; give a file path")
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder; give a file path for the {what}")
    check_writable_under(path.parent, path)
    return path


def check_writable_under(folder: Path, target: Path) -> None:
    """Refuse ``target`` (a file or a folder to create under ``folder``) when the nearest existing
    folder on the way is a file or not writable. Missing folders are fine: they are created."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is a file, so {target} cannot be written")
    if not os.access(folder, os.W_OK):
        raise ArtifactError(f"{folder} is not writable, so {target} cannot be written")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def load_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON (truncated or edited?): {e}") from e


def save_tensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Save tensors as safetensors, atomically (the tensors are made contiguous and detached)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Load a safetensors file and its metadata; a damaged file raises ``ArtifactError``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad header or short file
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return tensors, metadata
