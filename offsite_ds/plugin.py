"""Plug-in: validate an AdapterPackage against a model and write the tuned adapter blocks into it.

The package is rebuilt on the receiving model with the same `apply_mode` the data owner used, so the
names, shapes and dtypes every tensor must have come from one piece of code; anything else is refused
with one line. LoRA (and BitFit, full) end merged into plain weights; Houlsby adapters stay as modules.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from offsite_ds.atomic import atomic_dir, write_json
from offsite_ds.bundle import (PEFT_DIR, AdapterPackage, Bundle, adapter_blocks, fingerprint_model, load_adapter_package,
                               read_safetensors)
from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.families import family_of, get_path
from offsite_ds.peft_modes import apply_mode, canonical_name, merge_lora_, rename_blocks

PLUGGED_FORMAT = "offsite-ds.plugged-model"
PLUGGED_MANIFEST = "offsite.json"


def install_adapter(model: torch.nn.Module, package: AdapterPackage, original_to_position: dict[int, int]) -> None:
    """Apply the package's mode at the mapped block positions and load its tensors, after checking them."""
    family = family_of(model)
    manifest = package.manifest
    if family.name != manifest["family"]:
        raise ArtifactError(f"{package.path}: adapter was tuned for family '{manifest['family']}', "
                            f"this model is '{family.name}'")
    positions = [original_to_position[i] for i in adapter_blocks(manifest)]
    n_blocks = len(get_path(model, family.blocks))
    if any(p >= n_blocks for p in positions):
        raise ArtifactError(f"{package.path}: adapter blocks {adapter_blocks(manifest)} do not fit a model of "
                            f"{n_blocks} blocks")
    try:
        apply_mode(model, positions, package.mode, manifest["mode_settings"])
    except OffsiteError as exc:
        raise ArtifactError(f"{package.path}: cannot re-create mode '{package.mode}': {exc}")
    position_to_original = {p: i for i, p in original_to_position.items()}
    live = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    expected = rename_blocks(live, family, position_to_original)
    missing = sorted(set(expected) - set(package.tensors))
    extra = sorted(set(package.tensors) - set(expected))
    if missing:
        raise ArtifactError(f"{package.path}: missing tensor '{missing[0]}' (+{len(missing) - 1} more) for mode "
                            f"'{package.mode}'")
    if extra:
        raise ArtifactError(f"{package.path}: unexpected tensor '{extra[0]}' (+{len(extra) - 1} more) for mode "
                            f"'{package.mode}'")
    by_original = dict(zip(expected, live.values()))
    for name, param in by_original.items():
        tensor = package.tensors[name]
        if tensor.shape != param.shape:
            raise ArtifactError(f"{package.path}: tensor '{name}' has shape {list(tensor.shape)}, the model needs "
                                f"{list(param.shape)}")
        if tensor.dtype != param.dtype:
            raise ArtifactError(f"{package.path}: tensor '{name}' is {tensor.dtype}, the model needs {param.dtype}")
    with torch.no_grad():
        for name, param in by_original.items():
            param.copy_(package.tensors[name].to(param.device))
    for p in model.parameters():
        p.requires_grad_(False)


def plug_in(model: torch.nn.Module, package: AdapterPackage, check_fingerprint: bool = True) -> torch.nn.Module:
    """The owner's full model with the tuned adapter blocks (in place); LoRA merged into the weights."""
    manifest = package.manifest
    depth = len(get_path(model, family_of(model).blocks))
    if depth != manifest["base_depth"]:
        raise ArtifactError(f"{package.path}: adapter was tuned for a {manifest['base_depth']}-block model, "
                            f"this model has {depth}")
    if check_fingerprint and fingerprint_model(model) != manifest["base_fingerprint"]:
        raise ArtifactError(f"{package.path}: adapter was tuned against other weights (base fingerprint "
                            f"{manifest['base_fingerprint'][:12]}... does not match this model's); plug it into "
                            "the model its emulator was made from")
    blocks = adapter_blocks(manifest)
    install_adapter(model, package, {i: i for i in blocks})
    if package.mode == "lora":
        merge_lora_(model)
    return model


def apply_to_emulator(bundle: Bundle, package: AdapterPackage) -> torch.nn.Module:
    """The 'OT Emulator' row: the shipped emulator carrying the tuned adapter blocks."""
    if package.manifest["bundle_fingerprint"] != bundle.fingerprint:
        raise ArtifactError(f"{package.path}: adapter was tuned on another emulator bundle than {bundle.path}")
    mapping = {bundle.manifest["block_map"][p]: p for p in bundle.manifest["adapter_positions"]}
    install_adapter(bundle.model, package, mapping)
    if package.mode == "lora":
        merge_lora_(bundle.model)
    return bundle.model


def plugin(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Owner's `plugin` command: validate, plug in, export a model dir that `from_pretrained` loads."""
    from offsite_ds.runtime import load_model

    package = load_adapter_package(adapter_dir)  # validate before loading a large model
    model = load_model(model_dir)
    plug_in(model, package)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if (Path(adapter_dir) / PEFT_DIR).is_dir():
            shutil.copytree(Path(adapter_dir) / PEFT_DIR, tmp / PEFT_DIR)
        write_json(tmp / PLUGGED_MANIFEST, {
            "format": PLUGGED_FORMAT, "version": 1, "mode": package.mode,
            "mode_settings": package.manifest["mode_settings"], "adapter_blocks": adapter_blocks(package.manifest),
            "base_fingerprint": package.manifest["base_fingerprint"],
            "bundle_fingerprint": package.manifest["bundle_fingerprint"],
            "training": package.manifest.get("training", {}),
        })
    return Path(out_dir)


def load_model_dir(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load any model directory the toolkit writes: a bundle (validated), a plugged model, a plain HF dir.

    A plugged model tuned with Houlsby adapters carries modules plain `from_pretrained` does not know;
    they are re-inserted here before the weights load.
    """
    from offsite_ds.bundle import BUNDLE_FORMAT, load_bundle

    from offsite_ds.runtime import require_model_dir

    path = require_model_dir(directory)
    manifest = {}
    if (path / PLUGGED_MANIFEST).is_file():
        manifest = json.loads((path / PLUGGED_MANIFEST).read_text())
    if manifest.get("format") == BUNDLE_FORMAT:
        bundle = load_bundle(path, dtype=dtype)
        return bundle.model, bundle.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if manifest.get("format") == PLUGGED_FORMAT and manifest.get("mode") == "adapter":
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        apply_mode(model, manifest["adapter_blocks"], "adapter", manifest["mode_settings"])
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(read_safetensors(file))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not _is_tied(model, m)]
        if missing or unexpected:
            raise ArtifactError(f"{path}: weights do not match the plugged model ({(missing + unexpected)[0]})")
        model.tie_weights()
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval(), tokenizer
    from offsite_ds.runtime import load_model

    return load_model(path, dtype), tokenizer


def _is_tied(model, name: str) -> bool:
    head = family_of(model).head
    return name.startswith(head + ".") and bool(getattr(model.config, "tie_word_embeddings", False))
