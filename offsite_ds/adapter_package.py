"""The AdapterPackage: the data owner's tuned adapter tensors, going back to the model owner.

Written by the data owner's tuning and validated end to end by whoever receives it. With the receiving
model's config.json, the tensors a package must hold are derived from its own settings (the tuning
mode re-applied to a meta-device model), so a package cannot make the receiver allocate or load
anything that model would not have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from offsite_ds.artifact_files import read_json_listed, safetensors_header
from offsite_ds.atomic import atomic_dir, write_json
from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.fingerprints import describe_files
from offsite_ds.formats import MAX_HEADER_BYTES, SAFETENSORS_NAMES, dtype_name
from offsite_ds.manifests import ADAPTER_FORMAT, FORMAT_VERSION, MANIFEST, AdapterManifest, dump
from offsite_ds.validation import (MAX_JSON_BYTES, check_model_config, meta_model, no_code_or_paths, read_manifest,
                                   read_safetensors, verify_files)

ADAPTER_WEIGHTS = "adapter.safetensors"
PEFT_DIR = "peft"
PEFT_FILES = (f"{PEFT_DIR}/adapter_config.json", f"{PEFT_DIR}/adapter_model.safetensors")
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before a tensor's name in adapter_model.safetensors


@dataclass
class AdapterPackage:
    path: Path
    tensors: dict[str, torch.Tensor]
    manifest: AdapterManifest

    @property
    def mode(self) -> str:
        return self.manifest.mode


def tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Name -> {shape, dtype} of each tensor, sorted: the table a manifest lists and a loader checks."""
    return {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
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
        full = AdapterManifest.model_validate({"format": ADAPTER_FORMAT, "version": FORMAT_VERSION, **manifest,
                                               "tensors": tensor_table(tensors), "files": files})
        write_json(tmp / MANIFEST, dump(full))
    return Path(out_dir)


def expected_adapter_tensors(manifest: AdapterManifest, config: dict, dtype: torch.dtype, where: str
                             ) -> dict[str, tuple[list[int], str]]:
    """The tensors a package must hold for a model of `config`: its own settings bounded by the model's
    sizes first (LoRA r, bottleneck, targets), then the mode applied to a meta-device model."""
    from offsite_ds.families import block_linears, family_of, get_path
    from offsite_ds.peft_modes import apply_mode, check_bottleneck, trainable_state

    check_model_config(config, f"{where}: the model's config.json", manifest.family_spec, manifest.base_depth)
    meta = meta_model(config, dtype, f"{where}: the model's config.json")
    family = family_of(meta)
    if family.name != manifest.family:
        raise ArtifactError(f"{where}: adapter was tuned for family '{manifest.family}', this model is '{family.name}'")
    block = get_path(meta, family.blocks)[manifest.adapter_blocks[0]] if manifest.adapter_blocks else None
    linears = block_linears(block) if block is not None else {}
    settings = manifest.mode_settings
    if manifest.mode == "lora":
        targets = settings.targets or list(family.lora_targets)
        widths = []
        for t in targets:
            hit = [min(io) for n, io in linears.items() if n == t or n.endswith("." + t)]
            if not hit:
                raise ArtifactError(f"{where}: LoRA target '{t}' is not a linear layer of a {family.name} block "
                                    f"(those are {', '.join(sorted(n.rsplit('.', 1)[-1] for n in linears))})")
            widths += hit
        if settings.r > min(widths):
            raise ArtifactError(f"{where}: LoRA r={settings.r} exceeds min(in, out)={min(widths)} of its targets")
    if manifest.mode == "adapter":
        try:
            check_bottleneck(settings.bottleneck or 0, linears.get(family.attn_out, (0, 0))[1], "bottleneck")
        except OffsiteError as exc:
            raise ArtifactError(f"{where}: {exc}")
    try:
        with torch.device("meta"):
            apply_mode(meta, manifest.adapter_blocks, manifest.mode, settings)
    except OffsiteError as exc:
        raise ArtifactError(f"{where}: cannot re-create mode '{manifest.mode}': {exc}")
    return {n: (list(t.shape), dtype_name(t.dtype)) for n, t in trainable_state(meta).items()}


def _table_bytes(table: dict[str, tuple[list[int], str]]) -> int:
    return sum(math.prod(shape) * getattr(torch, dtype).itemsize for shape, dtype in table.values())


def load_adapter_package(directory: str | Path, model_config: dict | None = None,
                         dtype: torch.dtype = torch.float32) -> AdapterPackage:
    """Validate an AdapterPackage end to end and load its tensors.

    With the receiving model's `model_config` (config.json as JSON), the settings and the tensor table
    are checked against what that model needs before a byte of the weights is read.
    """
    directory = Path(directory)
    where = str(directory)
    manifest = read_manifest(directory, ADAPTER_FORMAT)
    table = {n: (e.shape, e.dtype) for n, e in manifest.tensors.items()}
    if model_config is not None:
        expected = expected_adapter_tensors(manifest, model_config, dtype, where)
        for name in sorted(set(expected) | set(table)):
            if name not in table:
                raise ArtifactError(f"{where}: missing tensor '{name}' for mode '{manifest.mode}'")
            if name not in expected:
                raise ArtifactError(f"{where}: unexpected tensor '{name}' for mode '{manifest.mode}'")
            if table[name] != expected[name]:
                raise ArtifactError(f"{where}: tensor '{name}' is {table[name][0]} {table[name][1]}, the model needs "
                                    f"{expected[name][0]} {expected[name][1]}")
    for rel in manifest.files:
        if rel not in (ADAPTER_WEIGHTS, *PEFT_FILES):
            raise ArtifactError(f"{where}: '{rel}' is not a file a package may hold")
    if ADAPTER_WEIGHTS not in manifest.files:
        raise ArtifactError(f"{where}: {MANIFEST} does not list {ADAPTER_WEIGHTS}; the package is incomplete")
    limit = 8 + MAX_HEADER_BYTES + _table_bytes(table)
    for rel in (ADAPTER_WEIGHTS, PEFT_FILES[1]):
        if rel in manifest.files and manifest.files[rel].bytes > limit:
            raise ArtifactError(f"{where}: '{rel}' claims {manifest.files[rel].bytes} bytes, more than its tensors need")
    verify_files(directory, manifest)
    tensors = read_safetensors(directory, ADAPTER_WEIGHTS, table)
    if PEFT_FILES[1] in manifest.files:
        peft_table = {f"{PEFT_PREFIX}{n}": v for n, v in table.items()}
        spans = safetensors_header(directory, PEFT_FILES[1])
        if {n: (list(s.shape), SAFETENSORS_NAMES.get(s.dtype)) for n, s in spans.items()} != peft_table:
            raise ArtifactError(f"{where}: {PEFT_FILES[1]} does not hold the package's tensors")
    if PEFT_FILES[0] in manifest.files:
        peft_config = read_json_listed(directory, PEFT_FILES[0], MAX_JSON_BYTES)
        if not isinstance(peft_config, dict):
            raise ArtifactError(f"{where}: {PEFT_FILES[0]} is not a JSON object")
        no_code_or_paths(peft_config, f"{where}/{PEFT_FILES[0]}")
    return AdapterPackage(directory, tensors, manifest)
