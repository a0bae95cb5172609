"""Sharded sampling over processes (``torchrun``), with atomic per-shard files and resume.

The sample set is cut into fixed shards of ``shard_size`` consecutive sample indices; shard ``i``
belongs to rank ``i % world``. Each shard draws its samples from the per-sample noise streams
``(seed, index)`` and is written atomically as one safetensors file, so:

- a rerun skips every shard already on disk (a killed job loses at most the shards in flight);
- the merged result does not depend on the number of processes: with the same shard size, each
  shard is the same batch in any run, so 2 ranks give bit for bit what 1 rank gives.

Rank 0 merges the shards (checking that each belongs to this run) and computes the metrics once.
NCCL on GPUs, gloo on CPUs, as DiT's own ``sample_ddp.py``.

Example (2 processes on CPU):
    torchrun --standalone --nproc_per_node=2 -m qc_compiler sample-ddp --model dit-mnist --n 1000 --out-dir out/ddp
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import ArtifactError
from .io import load_tensors, save_tensors

__all__ = ["shard_ranges", "sample_shards", "merge_shards", "init_distributed", "run_identity", "rank_world",
           "gather_by_index"]

log = logging.getLogger(__name__)


def shard_ranges(n: int, shard_size: int) -> List[Tuple[int, int]]:
    """[(start, stop)] covering 0..n-1 in shards of ``shard_size``."""
    if n < 1 or shard_size < 1:
        raise ValueError(f"n and shard_size must be >= 1, got {n}, {shard_size}")
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def run_identity(sampler, labels: Sequence[int], *, seed: int, shard_size: int, model_id: str) -> str:
    """A string that every shard of one run carries; a shard from another run is not reused.

    ``model_id`` should be a content digest of the model (``io.tensor_digest`` of its state dict),
    so that a recompile at the same path does not reuse the old model's shards; the labels enter as
    a digest of the whole list, in order."""
    labels_digest = hashlib.sha256(json.dumps([int(v) for v in labels]).encode()).hexdigest()
    return json.dumps({"sampler": sampler.spec(), "seed": seed, "n": len(labels), "shard_size": shard_size,
                       "labels": labels_digest, "model": model_id}, sort_keys=True)


def _shard_path(out_dir: Path, i: int) -> Path:
    return out_dir / f"shard_{i:05d}.safetensors"


def _valid_shard(path: Path, identity: str, start: int, stop: int) -> bool:
    if not path.is_file():
        return False
    try:
        tensors, meta = load_tensors(path)
    except ArtifactError:
        log.warning("shard %s is unreadable; sampling it again", path)
        return False
    return meta.get("run") == identity and tensors["images"].shape[0] == stop - start


def sample_shards(model, sampler, labels: Sequence[int], *, seed: int, out_dir, shard_size: int = 64,
                  rank: int = 0, world: int = 1, model_id: str = "", progress: bool = False) -> List[int]:
    """Sample this rank's shards that are not on disk yet; returns the shard indices it wrote."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = run_identity(sampler, labels, seed=seed, shard_size=shard_size, model_id=model_id)
    written = []
    for i, (start, stop) in enumerate(shard_ranges(len(labels), shard_size)):
        if i % world != rank or _valid_shard(_shard_path(out_dir, i), identity, start, stop):
            continue
        images = sampler.sample(model, labels[start:stop], seed=seed, sample_offset=start, progress=progress)
        save_tensors({"images": images.cpu(), "labels": torch.as_tensor(labels[start:stop], dtype=torch.long)},
                     _shard_path(out_dir, i), metadata={"run": identity, "start": str(start)})
        written.append(i)
    return written


def merge_shards(out_dir, sampler, labels: Sequence[int], *, seed: int, shard_size: int,
                 model_id: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
    """All shards of the run, in sample order: (images (N, C, H, W), labels (N,))."""
    out_dir = Path(out_dir)
    identity = run_identity(sampler, labels, seed=seed, shard_size=shard_size, model_id=model_id)
    images, ys = [], []
    for i, (start, stop) in enumerate(shard_ranges(len(labels), shard_size)):
        path = _shard_path(out_dir, i)
        if not _valid_shard(path, identity, start, stop):
            raise ArtifactError(f"shard {i} ({path}) is missing or belongs to another run; rerun to complete it")
        tensors, _ = load_tensors(path)
        images.append(tensors["images"])
        ys.append(tensors["labels"])
    return torch.cat(images), torch.cat(ys)


def init_distributed() -> Tuple[int, int]:
    """(rank, world) from torchrun's environment, with the process group up; (0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def rank_world() -> Tuple[int, int]:
    """(rank, world) of an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_by_index(local: Dict[int, object]) -> Dict[int, object]:
    """Every rank's ``{index: item}`` merged, on every rank (items travel between our own processes)."""
    rank, world = rank_world()
    if world == 1:
        return dict(local)
    import torch.distributed as dist

    parts: List[Optional[Dict[int, object]]] = [None] * world
    dist.all_gather_object(parts, local)
    merged: Dict[int, object] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
