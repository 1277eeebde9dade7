"""Identities of models and artifact files: what a bundle and a package are named by, and checked against.

Kept apart from validation (which reads untrusted input) and from the artifacts' I/O: the owner
fingerprints its own checkpoint before anything crosses the boundary, and both artifacts list their
files' sizes and hashes the same way.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from offsite_ds.manifests import MANIFEST
from offsite_ds.shards import ModelCheckpoint
from offsite_ds.zero3 import full_shape

# one tensor as `_fingerprint` reads it (its docstring names the fields)
Entry = tuple[str, tuple[int, ...], torch.dtype, int, Callable[[int, int], torch.Tensor]]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fingerprint(entries: Iterable[Entry], sample_bytes: int) -> str:
    """The hash behind both fingerprints: per tensor (sorted by name) its name, shape, dtype and two ends.

    Floating tensors are hashed as float32 (the dtype the owner's commands load in), so a bf16 checkpoint
    and the same weights loaded in fp32 have one identity. `entries` are (name, shape, dtype, numel,
    read(start, stop) -> flat elements as hashed).
    """
    h = hashlib.sha256()
    for name, shape, dtype, numel, read in sorted(entries, key=lambda e: e[0]):
        hashed = torch.float32 if dtype.is_floating_point else dtype
        h.update(f"{name}|{tuple(shape)}|{hashed}|".encode())
        if numel == 0:
            continue
        size = 1 if hashed == torch.bool else hashed.itemsize
        k = sample_bytes // size
        parts = [read(0, min(numel, k))] + ([read(numel - k, numel)] if numel * size > sample_bytes else [])
        for part in parts:
            part = part.to(hashed).contiguous()
            raw = part.view(torch.uint8) if part.dtype != torch.bool else part.to(torch.uint8)
            h.update(raw.numpy().tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def fingerprint_model(model: torch.nn.Module, sample_bytes: int = 1 << 16) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and a hash of each tensor's ends.

    Hashing every byte of a 7B model takes minutes; the two ends of each tensor identify a checkpoint
    just as well for the purpose (refusing an adapter tuned against other weights).
    """
    def entry(name, tensor):
        flat = tensor.detach().reshape(-1).cpu()
        return (name, full_shape(tensor), tensor.dtype, tensor.numel(),
                lambda a, b: flat[a:b])

    return _fingerprint([entry(n, t) for n, t in model.state_dict().items()], sample_bytes)


def fingerprint_checkpoint(checkpoint: ModelCheckpoint, sample_bytes: int = 1 << 16) -> str:
    """`fingerprint_model` of the model a directory holds, read from its shards (a few KB per tensor).

    `checkpoint` is a shards.ModelCheckpoint; equal to fingerprint_model(runtime.load_model(dir)).
    """
    def entry(name):
        return (name, checkpoint.shapes[name], checkpoint.stored_dtype(name), math.prod(checkpoint.shapes[name]),
                lambda a, b: checkpoint.read_flat(name, a, b))

    return _fingerprint([entry(n) for n in checkpoint.state_names()], sample_bytes)


def describe_files(directory: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file in an artifact dir (recursively), except the manifest itself."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def files_fingerprint(files: dict[str, dict]) -> str:
    """One identity of a file list (`describe_files`): the fingerprint a bundle's manifest carries."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]
