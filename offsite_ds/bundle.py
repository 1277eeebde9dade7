"""The two artifacts that cross the owner / data-owner boundary: EmulatorBundle and AdapterPackage.

Both are directories of safetensors + JSON, described by `offsite.json`. Wherever they arrive they are
untrusted: the manifest is checked field by field, every listed file by size and then SHA-256, pickle
files are refused outright, and tensors are checked for names, shapes, dtypes and finiteness.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offsite_ds.atomic import atomic_dir, write_json
from offsite_ds.errors import ArtifactError
from offsite_ds.zero3 import full_shape

MANIFEST = "offsite.json"
BUNDLE_FORMAT = "offsite-ds.emulator-bundle"
ADAPTER_FORMAT = "offsite-ds.adapter-package"
FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
PEFT_DIR = "peft"
MAX_MANIFEST_BYTES = 4 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def fingerprint_model(model: torch.nn.Module, sample_bytes: int = 1 << 16) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and a hash of each tensor's ends.

    Hashing every byte of a 7B model takes minutes; the two ends of each tensor identify a checkpoint
    just as well for the purpose (refusing an adapter tuned against other weights).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        shape = tuple(full_shape(tensor))
        h.update(f"{name}|{shape}|{tensor.dtype}|".encode())
        if tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1).cpu().contiguous()
        raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        n = raw.numel()
        h.update(raw[: min(n, sample_bytes)].numpy().tobytes())
        if n > sample_bytes:
            h.update(raw[-sample_bytes:].numpy().tobytes())
    return h.hexdigest()[:32]


def describe_files(directory: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file in an artifact dir (recursively), except the manifest itself."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def files_fingerprint(files: dict[str, dict]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------- validation

def _need(manifest: dict, key: str, kind, where: str):
    if key not in manifest:
        raise ArtifactError(f"{where}: {MANIFEST} lacks '{key}'; the artifact is incomplete, re-export it")
    value = manifest[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ArtifactError(f"{where}: {MANIFEST} field '{key}' has the wrong type; re-export the artifact")
    return value


def read_manifest(directory: str | Path, expected_format: str) -> dict:
    """Read and check offsite.json: format, version, and the fields every artifact has."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; pass the artifact directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an offsite-ds artifact (expected {expected_format})")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; refusing it")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); re-export it")
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object; re-export it")
    fmt = manifest.get("format")
    if fmt != expected_format:
        raise ArtifactError(f"{directory}: format '{fmt}' is not '{expected_format}'; pass the right artifact")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{directory}: format version {version!r} is not supported (this offsite-ds reads "
                            f"version {FORMAT_VERSION}); export it again with a matching offsite-ds")
    where = str(directory)
    _need(manifest, "family", str, where)
    _need(manifest, "base_depth", int, where)
    _need(manifest, "base_fingerprint", str, where)
    block_map = _need(manifest, "block_map", list, where)
    if not all(isinstance(i, int) and 0 <= i < manifest["base_depth"] for i in block_map):
        raise ArtifactError(f"{where}: block_map has indices outside the base model's {manifest['base_depth']} blocks")
    positions = _need(manifest, "adapter_positions", list, where)
    if not all(isinstance(i, int) and 0 <= i < len(block_map) for i in positions):
        raise ArtifactError(f"{where}: adapter_positions point outside the emulator's {len(block_map)} blocks")
    _need(manifest, "files", dict, where)
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Every listed file present, of its stated size, with its stated hash; no pickle and no stowaways."""
    listed = manifest["files"]
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise ArtifactError(f"{directory}: '{rel}' is a symbolic link; artifacts must hold plain files")
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            raise ArtifactError(f"{directory}: '{rel}' is a pickle-format file; only safetensors and JSON are accepted")
        if path.is_file() and rel != MANIFEST and rel not in listed:
            raise ArtifactError(f"{directory}: '{rel}' is not listed in {MANIFEST}; re-export the artifact")
    for rel, meta in listed.items():
        path = directory / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise ArtifactError(f"{directory}: listed file '{rel}' is missing; the artifact is incomplete")
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            raise ArtifactError(f"{directory}: {MANIFEST} entry for '{rel}' is malformed; re-export the artifact")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise ArtifactError(f"{directory}: '{rel}' has {size} bytes but {MANIFEST} says {meta['bytes']}; "
                                "the file was altered or truncated")
        if sha256_file(path) != meta["sha256"]:
            raise ArtifactError(f"{directory}: checksum mismatch for '{rel}'; the file was altered or corrupted")


def read_safetensors(path: Path, expected: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """Load tensors (safetensors never executes code) and check them against the manifest's table."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ArtifactError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})")
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing:
            raise ArtifactError(f"{path}: missing tensor '{missing[0]}' (+{len(missing) - 1} more) listed in {MANIFEST}")
        if extra:
            raise ArtifactError(f"{path}: unexpected tensor '{extra[0]}' (+{len(extra) - 1} more) not in {MANIFEST}")
        for name, meta in expected.items():
            t = tensors[name]
            if list(t.shape) != list(meta.get("shape", [])) or str(t.dtype).removeprefix("torch.") != meta.get("dtype"):
                raise ArtifactError(f"{path}: tensor '{name}' is {list(t.shape)} {t.dtype}, {MANIFEST} says "
                                    f"{meta.get('shape')} {meta.get('dtype')}")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: tensor '{name}' holds NaN or Inf values; refusing it")
    return tensors


# ------------------------------------------------------------------------------------- EmulatorBundle

@dataclass
class Bundle:
    path: Path
    model: torch.nn.Module
    tokenizer: object
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


def save_bundle(model, tokenizer, manifest: dict, out_dir: str | Path) -> Path:
    """Write an EmulatorBundle: a plain HF model dir (safetensors) + tokenizer + offsite.json."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = describe_files(tmp)
        full = {"format": BUNDLE_FORMAT, "version": FORMAT_VERSION, **manifest, "files": files,
                "fingerprint": files_fingerprint(files)}
        write_json(tmp / MANIFEST, full)
    return Path(out_dir)


def check_bundle(directory: str | Path) -> dict:
    """Validate a bundle directory without loading the model; returns its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory, BUNDLE_FORMAT)
    verify_files(directory, manifest)
    if manifest.get("fingerprint") != files_fingerprint(manifest["files"]):
        raise ArtifactError(f"{directory}: bundle fingerprint does not match its file list; re-export it")
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else None
    if config is None:
        raise ArtifactError(f"{directory}: no config.json; the bundle is incomplete")
    return manifest


def load_bundle(directory: str | Path, dtype: torch.dtype = torch.float32) -> Bundle:
    """Validate, then load the emulator model (safetensors only) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offsite_ds.families import blocks_of, family_of

    directory = Path(directory)
    manifest = check_bundle(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True,
                                                 local_files_only=True, trust_remote_code=False)
    family = family_of(model)
    if family.name != manifest["family"]:
        raise ArtifactError(f"{directory}: manifest says family '{manifest['family']}' but the model is '{family.name}'")
    if len(blocks_of(model)) != len(manifest["block_map"]):
        raise ArtifactError(f"{directory}: the model has {len(blocks_of(model))} blocks but block_map lists "
                            f"{len(manifest['block_map'])}; the bundle is inconsistent")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    return Bundle(directory, model.eval(), tokenizer, manifest)


# ------------------------------------------------------------------------------------ AdapterPackage

@dataclass
class AdapterPackage:
    path: Path
    tensors: dict[str, torch.Tensor]
    manifest: dict

    @property
    def mode(self) -> str:
        return self.manifest["mode"]


def tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in sorted(tensors.items())}


def save_adapter_package(tensors: dict[str, torch.Tensor], manifest: dict, out_dir: str | Path,
                         peft_files: dict[str, bytes] | None = None) -> Path:
    """Write an AdapterPackage: only the trainable tensors, named by original block index, + offsite.json."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for rel, data in (peft_files or {}).items():
            target = tmp / PEFT_DIR / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        files = describe_files(tmp)
        write_json(tmp / MANIFEST, {"format": ADAPTER_FORMAT, "version": FORMAT_VERSION, **manifest,
                                    "tensors": tensor_table(tensors), "files": files})
    return Path(out_dir)


def load_adapter_package(directory: str | Path) -> AdapterPackage:
    """Validate an AdapterPackage end to end and load its tensors."""
    directory = Path(directory)
    manifest = read_manifest(directory, ADAPTER_FORMAT)
    where = str(directory)
    _need(manifest, "mode", str, where)
    _need(manifest, "mode_settings", dict, where)
    _need(manifest, "bundle_fingerprint", str, where)
    table = _need(manifest, "tensors", dict, where)
    if ADAPTER_WEIGHTS not in manifest["files"]:
        raise ArtifactError(f"{directory}: {MANIFEST} does not list {ADAPTER_WEIGHTS}; the package is incomplete")
    verify_files(directory, manifest)
    tensors = read_safetensors(directory / ADAPTER_WEIGHTS, expected=table)
    return AdapterPackage(directory, tensors, manifest)


def adapter_blocks(manifest: dict) -> list[int]:
    """Original indices of the adapter blocks a package or bundle covers (both sides read it here)."""
    return [manifest["block_map"][p] for p in manifest["adapter_positions"]]
