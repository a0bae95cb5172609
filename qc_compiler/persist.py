"""The artefact folder of a compiled model: safetensors and JSON, never pickles, every byte checked.

A compiled model is saved as what rebuilds it: the model adapter's name and config, the source FP
weights, the pass schedule (registered pass names and options), the sampler spec, the backend, and
everything the passes fitted (quantization ranges, cache schedules, VC tables). ``qc.load_compiled``
replays the schedule with the fitted state restored, so nothing is calibrated again.

    folder/
      manifest.json        format, version, what to rebuild, SHA-256 of each file, and its own digest
      weights.safetensors  FP weights of the source model
      fitted.safetensors   tensors the passes fitted (non-tensor fits live in the manifest)

A model compiled for several step tables (``CompiledSchedules``) is one folder too: the weights once,
the manifest's ``schedules`` lists each table's sampler and non-tensor fits, and its fitted tensors
are keyed ``schedule<i>/...``.

Integrity: the manifest lists the SHA-256 of every other file and carries the SHA-256 of its own
canonical content (``digest``). Loading refuses an edited manifest, an edited, missing or added file,
and names the file. This catches corruption and edits; it is not a signature (whoever can rewrite the
folder can rewrite the digests), so load artefacts from places you trust.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_manifest({"format": FORMAT, "format_version": FORMAT_VERSION, "files": {}}, folder)
    >>> read_manifest(folder)["format_version"] == FORMAT_VERSION
    True
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from .errors import ArtifactError
from .io import check_writable_under, load_json, load_tensors, save_json, save_tensors, sha256_file

__all__ = ["FORMAT", "FORMAT_VERSION", "save_compiled", "save_schedules", "split_schedules", "load_artifact",
           "read_manifest", "write_manifest", "check_output_folder"]

FORMAT = "qc-compiler/compiled"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SCHEDULE_PREFIX = "schedule"  # fitted tensors of step table i are "schedule<i>/<key>"
_FILES = ("weights.safetensors", "fitted.safetensors")
_RECOMPILE = ("recompile it with this version (`qc compile ... --out FOLDER`, or qc.compile(...).save(FOLDER)) "
              "from the original model")


def _digest(manifest: Dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_output_folder(folder: Path) -> None:
    """Refuse, before any work, a folder that cannot take an artefact: a file, a non-empty folder
    holding anything but an earlier artefact's files (which are replaced), or one that cannot be
    written (nor created)."""
    folder = Path(folder)
    if str(folder) in ("", "."):
        raise ArtifactError("the output folder is empty or '.'; name a new folder, e.g. --out out/model")
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder} exists and is not a folder; name a new folder")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, *_FILES))
        if foreign:
            raise ArtifactError(f"{folder} is not empty (it holds {foreign[:3]}); name a new or empty folder")
    check_writable_under(folder, folder)  # the folder itself, or the one it will be created in


def write_manifest(manifest: Dict[str, Any], folder: Path) -> None:
    """Write ``manifest`` with its digest, atomically (last, so a crash never leaves a valid folder half-written)."""
    manifest = dict(manifest)
    manifest["digest"] = _digest(manifest)
    save_json(manifest, Path(folder) / MANIFEST)


def read_manifest(folder: Path) -> Dict[str, Any]:
    """The manifest, after checking its format, version and digest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is missing or not a folder")
    manifest = load_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{folder} is not a qc-compiler compiled model (manifest format missing)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{folder} has artefact format version {version}; this qc-compiler reads version "
                            f"{FORMAT_VERSION}: {_RECOMPILE}")
    if manifest.get("digest") != _digest(manifest):
        raise ArtifactError(f"{folder / MANIFEST} does not match its digest: it was edited or damaged; {_RECOMPILE}")
    return manifest


def save_compiled(model, folder: Path) -> None:
    """Write ``model`` (a CompiledModel) to ``folder``; the manifest is written last, atomically."""
    _save(model.build, [(model.sampler_spec, model.build.get("fitted", {}))], Path(folder))


def save_schedules(models, folder: Path) -> None:
    """Write compiled models of one source model, one per step table (a ``CompiledSchedules``), as one
    artefact: the weights once, each table's sampler in ``schedules`` and its fitted tensors under
    ``schedule<i>/`` in fitted.safetensors."""
    _save(models[0].build, [(m.sampler_spec, m.build.get("fitted", {})) for m in models], Path(folder))


def _save(build: Dict[str, Any], tables, folder: Path) -> None:
    if build.get("unsaveable"):
        raise ArtifactError(f"cannot be saved: {build['unsaveable'][0]}")
    if build.get("model_config") is None:
        raise ArtifactError(f"the {build.get('adapter', 'model')!r} adapter gives no config to rebuild this model "
                            "from, so it cannot be saved")
    check_output_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    jsons = []
    for i, (_, fitted) in enumerate(tables):
        prefix = f"{SCHEDULE_PREFIX}{i}/" if len(tables) > 1 else ""
        tensors.update({prefix + k: v for k, v in fitted.items() if torch.is_tensor(v)})
        jsons.append({k: v for k, v in fitted.items() if not torch.is_tensor(v)})
    save_tensors(build["weights"], folder / "weights.safetensors")
    save_tensors(tensors, folder / "fitted.safetensors")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter": build["adapter"],
        "model_config": build["model_config"],
        "passes": build.get("passes", []),
        "backend": build.get("backend", "torch"),
        "seed": build.get("seed", 0),
        "capture_mode": build.get("capture_mode"),
        "geometry": build.get("geometry"),  # the size a text family was compiled for (None: fixed-size family)
        "sampler": tables[0][0],
        "fitted_json": jsons[0],
        "files": {name: sha256_file(folder / name) for name in _FILES},
    }
    if len(tables) > 1:  # several step tables: each one's sampler and non-tensor fits
        manifest["schedules"] = [{"sampler": spec, "fitted_json": js} for (spec, _), js in zip(tables, jsons)]
    write_manifest(manifest, folder)


def split_schedules(manifest: Dict[str, Any], fitted: Dict[str, Any]) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(sampler spec, fitted state) per step table of a loaded artefact: one for a single-table model."""
    schedules = manifest.get("schedules")
    if schedules is None:
        return [(manifest["sampler"], fitted)]
    if not isinstance(schedules, list) or len(schedules) < 2:
        raise ArtifactError("manifest.json's schedules must list two or more step tables")
    out = []
    for i, entry in enumerate(schedules):
        prefix = f"{SCHEDULE_PREFIX}{i}/"
        part = {k[len(prefix):]: v for k, v in fitted.items() if k.startswith(prefix)}
        part.update(entry.get("fitted_json", {}))
        out.append((entry["sampler"], part))
    return out


def load_artifact(folder) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Dict[str, Any]]:
    """(manifest, FP weights, fitted state) of a saved compiled model, every file checked.

    Raises ``ArtifactError`` naming the file for an edited manifest, an edited, truncated, missing or
    extra file, or an older format version.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES):
        raise ArtifactError(f"{folder / MANIFEST} lists files {sorted(files or {})}, expected {list(_FILES)}")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, *_FILES))
    if extra:
        raise ArtifactError(f"{folder} holds files the manifest does not list: {extra}; remove them, or recompile")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path} does not match its SHA-256 in the manifest: it was truncated or modified")
    weights, _ = load_tensors(folder / "weights.safetensors")
    fitted: Dict[str, Any] = dict(load_tensors(folder / "fitted.safetensors")[0])
    fitted.update(manifest.get("fitted_json", {}))
    return manifest, weights, fitted
