"""Save and load compiled models as a folder of safetensors and JSON, never pickles.

A compiled model is saved as what rebuilds it: the model config and FP weights, the pass schedule
(registered pass names and options), the sampler spec, and everything the passes fitted
(quantization ranges, cache schedules, VC tables). Loading replays the schedule with the fitted state
restored, so nothing is calibrated again, and the graph is the same one the compiler produced.

    folder/
      manifest.json        format version, config, passes, sampler, backend, SHA-256 of each file
      weights.safetensors  FP32 weights of the source model
      fitted.safetensors   tensors the passes fitted (non-tensor fits live in the manifest)

Example:
    >>> import qc_compiler as qc, tempfile                                # doctest: +SKIP
    >>> cm = qc.compile(qc.load_model("DiT-T/4", input_size=16), passes=[])
    >>> cm.save(tempfile.mkdtemp() + "/m"); qc.load_compiled(...)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from .errors import ArtifactError
from .io import load_json, load_tensors, save_json, save_tensors, sha256_file

__all__ = ["save_compiled", "load_compiled"]

FORMAT = "qc-compiler/compiled"
FORMAT_VERSION = 1
_FILES = ("weights.safetensors", "fitted.safetensors")


def save_compiled(model, folder: Path) -> None:
    """Write ``model`` (a CompiledModel) to ``folder``; the manifest is written last, atomically."""
    from .pipeline import PASS_REGISTRY

    build = model.build
    if not build.get("model_config"):
        raise ArtifactError("only models built from a qc_compiler DiT config can be saved (no model config)")
    for p in build.get("passes", []):
        if p["name"] not in PASS_REGISTRY:
            raise ArtifactError(f"pass {p['name']!r} is not registered (use @register_pass), so it cannot be reloaded")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in build.get("fitted", {}).items() if torch.is_tensor(v)}
    others = {k: v for k, v in build.get("fitted", {}).items() if not torch.is_tensor(v)}
    save_tensors(build["weights"], folder / "weights.safetensors")
    save_tensors(tensors, folder / "fitted.safetensors")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": build["model_config"],
        "passes": build.get("passes", []),
        "backend": build.get("backend", "torch"),
        "seed": build.get("seed", 0),
        "capture_mode": build.get("capture_mode", "fx"),
        "sampler": model.sampler_spec,
        "fitted_json": others,
        "sha256": {name: sha256_file(folder / name) for name in _FILES},
    }
    save_json(manifest, folder / "manifest.json")


def load_compiled(folder) -> Any:
    """Rebuild a CompiledModel saved by ``save_compiled``; a damaged folder raises ``ArtifactError``."""
    from .api import compile as qc_compile
    from .diffusion.samplers import sampler_from_spec
    from .models.zoo import build_model
    from .pipeline import PASS_REGISTRY

    folder = Path(folder)
    manifest = load_json(folder / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{folder} is not a qc-compiler compiled model (manifest format missing)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder} has format version {manifest.get('format_version')}; this qc-compiler reads {FORMAT_VERSION}")
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing")
        if sha256_file(path) != manifest["sha256"].get(name):
            raise ArtifactError(f"{path} does not match its SHA-256 in the manifest: it was truncated or modified")
    weights, _ = load_tensors(folder / "weights.safetensors")
    fitted: Dict[str, Any] = dict(load_tensors(folder / "fitted.safetensors")[0])
    fitted.update(manifest.get("fitted_json", {}))
    model = build_model(manifest["model_config"])
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{folder}/weights.safetensors does not fit the model config: {e}") from e
    passes = []
    for p in manifest["passes"]:
        if p["name"] not in PASS_REGISTRY:
            raise ArtifactError(f"{folder} uses pass {p['name']!r}, which this installation does not know")
        passes.append(PASS_REGISTRY[p["name"]](**p.get("options", {})))
    return qc_compile(model.eval(), passes=passes, sampler=sampler_from_spec(manifest["sampler"]),
                      backend=manifest["backend"], seed=manifest.get("seed", 0), fitted=fitted,
                      capture_mode=manifest.get("capture_mode", "fx"))
