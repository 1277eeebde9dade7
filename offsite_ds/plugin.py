"""Plug-in: validate an AdapterPackage against a model and write the tuned adapter blocks into it.

The package is rebuilt on the receiving model with the same `apply_mode` the data owner used, so the
names, shapes and dtypes every tensor must have come from one piece of code; anything else is refused
with one line. LoRA (and BitFit, full) end merged into plain weights; Houlsby adapters stay as modules.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from offsite_ds.artifact_files import read_json_listed
from offsite_ds.atomic import atomic_dir, write_json
from offsite_ds.adapter_package import PEFT_FILES, AdapterPackage, load_adapter_package
from offsite_ds.bundle import Bundle
from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.families import block_prefix, family_of, get_path
from offsite_ds.fingerprints import fingerprint_checkpoint, fingerprint_model
from offsite_ds.manifests import MANIFEST as PLUGGED_MANIFEST
from offsite_ds.manifests import PLUGGED_FORMAT, BundleManifest, PlugCheck, PluggedManifest, dump, parse_manifest
from offsite_ds.peft_modes import apply_mode, canonical_name, merge_lora_, rename_blocks
from offsite_ds.shards import DEFAULT_SHARD_BYTES, ModelCheckpoint, ShardWriter
from offsite_ds.validation import read_model_config, read_safetensors


def install_adapter(model: torch.nn.Module, package: AdapterPackage, original_to_position: dict[int, int],
                    shipped: dict[str, torch.Tensor] | None = None, into_model: bool = True) -> None:
    """Apply the package's mode at the mapped block positions and load its tensors, after checking them.

    With `shipped` (an aligned bundle's adapter tensors, `shipped_adapter`) a tensor of the block itself gets
    the model's value plus the data owner's change, model + (tuned - shipped): the alignment is the owner's
    emulator's, not the task's. New tensors (LoRA, Houlsby) are added to the model's blocks as they are.
    `into_model=False` installs into the emulator the package was tuned on, where the tensors are what they say.
    """
    family = family_of(model)
    manifest = package.manifest
    if family.name != manifest.family:
        raise ArtifactError(f"{package.path}: adapter was tuned for family '{manifest.family}', "
                            f"this model is '{family.name}'")
    positions = [original_to_position[i] for i in manifest.adapter_blocks]
    n_blocks = len(get_path(model, family.blocks))
    if any(p >= n_blocks for p in positions):
        raise ArtifactError(f"{package.path}: adapter blocks {manifest.adapter_blocks} do not fit a model of "
                            f"{n_blocks} blocks")
    position_to_original = {p: i for i, p in original_to_position.items()}
    blocks = get_path(model, family.blocks)
    base = {f"{block_prefix(family, i)}{n}" for i, p in original_to_position.items()  # the blocks' own tensors
            for n, _ in blocks[p].named_parameters()}
    try:
        apply_mode(model, positions, package.mode, manifest.mode_settings)
    except OffsiteError as exc:
        raise ArtifactError(f"{package.path}: cannot re-create mode '{package.mode}': {exc}")
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
    if manifest.aligned and into_model and shipped is None and any(n in base for n in by_original):
        raise ArtifactError(f"{package.path}: tuned ({package.mode}) on an aligned emulator bundle, whose adapter "
                            "blocks are not the model's: pass the bundle you shipped (plugin --bundle BUNDLE)")
    with torch.no_grad():
        for name, param in by_original.items():
            tensor = package.tensors[name].to(param.device)
            if shipped is not None and name in base:  # param still holds the model's own value
                tensor = param.float() + (tensor.float() - shipped[name].to(param.device).float())
            param.copy_(tensor)
    for p in model.parameters():
        p.requires_grad_(False)


def check_base(package: AdapterPackage, depth: int, fingerprint=None) -> None:
    """The package was tuned for this model: its depth, and (when `fingerprint()` is given) its weights."""
    manifest = package.manifest
    if depth != manifest.base_depth:
        raise ArtifactError(f"{package.path}: adapter was tuned for a {manifest.base_depth}-block model, "
                            f"this model has {depth}")
    if fingerprint is not None and fingerprint() != manifest.base_fingerprint:
        raise ArtifactError(f"{package.path}: adapter was tuned against other weights (base fingerprint "
                            f"{manifest.base_fingerprint[:12]}... does not match this model's); plug it into "
                            "the model its emulator was made from")


def shipped_adapter(bundle_dir: str | Path, package: AdapterPackage, manifest: BundleManifest | None = None
                    ) -> dict[str, torch.Tensor] | None:
    """The adapter blocks' tensors as the bundle shipped them, by original block index (the package's names),
    where the bundle was aligned (else None: the model's own blocks were shipped). The bundle is validated and
    must be the one the package was tuned on, its alignment what the package says; only the adapter blocks
    are read. `manifest`: the bundle's, already checked in this process (check_bundle hashes every shard:
    minutes for a 7B owner's bundle, which a caller plugging several packages in pays once)."""
    from offsite_ds.bundle import check_bundle

    manifest = manifest or check_bundle(bundle_dir)
    if manifest.fingerprint != package.manifest.bundle_fingerprint:
        raise ArtifactError(f"{bundle_dir}: not the bundle {package.path} was tuned on (its fingerprint differs); "
                            "pass the emulator bundle you shipped for it")
    if package.manifest.aligned != manifest.aligned:  # the owner's own bundle says what was shipped
        raise ArtifactError(f"{package.path}: says aligned={package.manifest.aligned}, but {bundle_dir} was "
                            f"{'' if manifest.aligned else 'not '}aligned; the package was altered: ask for it again")
    if not manifest.aligned:
        return None
    checkpoint = ModelCheckpoint(bundle_dir)
    adapter = set(manifest.adapter_positions)
    shipped = {}
    for name in checkpoint.state_names():
        position, rest = checkpoint.block_of(name) or (None, "")
        if position in adapter:
            shipped[block_prefix(checkpoint.family, manifest.block_map[position]) + rest] = checkpoint.get(name)
    return shipped


def plug_in(model: torch.nn.Module, package: AdapterPackage, check_fingerprint: bool = True,
            shipped: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The owner's full model with the tuned adapter blocks (in place); LoRA merged into the weights.
    `shipped`: the bundle's adapter tensors, which a package tuned on an aligned bundle needs (install_adapter)."""
    manifest = package.manifest
    check_base(package, len(get_path(model, family_of(model).blocks)),
               (lambda: fingerprint_model(model)) if check_fingerprint else None)
    install_adapter(model, package, {i: i for i in manifest.adapter_blocks}, shipped)
    if package.mode == "lora":
        merge_lora_(model)
    return model


def apply_to_emulator(bundle: Bundle, package: AdapterPackage) -> torch.nn.Module:
    """The 'OT Emulator' row: the shipped emulator carrying the tuned adapter blocks."""
    if package.manifest.bundle_fingerprint != bundle.fingerprint:
        raise ArtifactError(f"{package.path}: adapter was tuned on another emulator bundle than {bundle.path}")
    mapping = {original: p for p, original in bundle.position_to_original.items()}
    install_adapter(bundle.model, package, mapping, into_model=False)
    if package.mode == "lora":
        merge_lora_(bundle.model)
    return bundle.model


def tuned_blocks(checkpoint: ModelCheckpoint, package: AdapterPackage,
                 shipped: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter blocks after plug-in (merged LoRA, BitFit, full; Houlsby modules added).

    Only the adapter blocks are built (in fp32, as the owner's model always loaded): the model is made on
    the meta device at the adapter blocks' depth, those blocks alone get real memory and the checkpoint's
    values, and the package is installed with the same `install_adapter` checks as the in-memory path.
    """
    from offsite_ds.surgery import set_depth

    family = checkpoint.family  # install_adapter refuses a package of another family
    blocks = package.manifest.adapter_blocks
    config = copy.deepcopy(checkpoint.config)
    set_depth(config, blocks)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    modules = get_path(model, family.blocks)
    for position, original in enumerate(blocks):
        block = modules[position].to_empty(device="cpu")
        names = block.state_dict()
        block.load_state_dict({rest: checkpoint.get(f"{block_prefix(family, original)}{rest}").float()
                               for rest in names}, strict=True)
    install_adapter(model, package, {original: position for position, original in enumerate(blocks)}, shipped)
    if package.mode == "lora":
        merge_lora_(model)
    return {f"{block_prefix(family, original)}{rest}": tensor.detach()
            for position, original in enumerate(blocks) for rest, tensor in modules[position].state_dict().items()}


def plugin(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, check_data: str | Path | None = None,
           check_tokens: int | None = None, text_field: str = "text", log=None,
           bundle_dir: str | Path | None = None) -> Path:
    """Owner's `plugin` command: validate, plug in, export a model dir that `from_pretrained` loads.

    Streamed: the package is validated in full against the owner's config.json first, the base
    fingerprint is read from the shards, and the checkpoint is copied tensor by tensor with only the
    adapter blocks' tensors replaced (each kept in its stored dtype), so memory is about the adapter
    blocks plus one tensor, not the model. With `check_data` (the owner's public text) the full model
    and the written plug-in are scored on its first `check_tokens` tokens (this loads both, one after
    the other), recorded as `check` in the plugged manifest, and a plug-in worse than the full model's
    zero-shot is reported through `log` (default: stderr) - the round trip did harm there. `bundle_dir`, the
    emulator the package was tuned on, is needed when that bundle was aligned (emulate --fit-align) and the
    package holds the blocks' own tensors (full, BitFit): its adapter tensors are taken out (install_adapter).
    """
    from offsite_ds.emulator import write_model_files

    package = load_adapter_package(adapter_dir, model_config=read_model_config(model_dir))
    manifest = package.manifest
    checkpoint = ModelCheckpoint(model_dir)
    check_base(package, checkpoint.depth, lambda: fingerprint_checkpoint(checkpoint))
    tuned = tuned_blocks(checkpoint, package, shipped_adapter(bundle_dir, package) if bundle_dir else None)
    dtype = checkpoint.dtype()
    with atomic_dir(out_dir) as tmp:
        stored = {name: checkpoint.stored_dtype(name) for name in checkpoint.held()}
        added = {name: (dtype if t.is_floating_point() else t.dtype) for name, t in tuned.items() if name not in stored}
        plan = [(name, checkpoint.shapes[name], dt) for name, dt in stored.items()]
        writer = ShardWriter(tmp, plan + [(name, list(tuned[name].shape), dt) for name, dt in added.items()],
                             max_shard_bytes)
        for name, dt in stored.items():
            writer.add(name, tuned[name].to(dt) if name in tuned else checkpoint.get(name))
        for name, dt in added.items():  # Houlsby modules: new tensors
            writer.add(name, tuned[name].to(dt))
        writer.close()
        del tuned
        write_model_files(checkpoint, copy.deepcopy(checkpoint.config), dtype, tmp)
        for rel in PEFT_FILES:  # only the listed, checked files
            if rel in manifest.files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(adapter_dir) / rel, tmp / rel, follow_symlinks=False)
        plugged = PluggedManifest(
            format=PLUGGED_FORMAT, version=1, mode=manifest.mode, mode_settings=manifest.mode_settings,
            adapter_blocks=manifest.adapter_blocks, base_fingerprint=manifest.base_fingerprint,
            bundle_fingerprint=manifest.bundle_fingerprint, training=manifest.training)
        write_json(tmp / PLUGGED_MANIFEST, dump(plugged))
        if check_data is not None:
            check = plug_check(model_dir, tmp, check_data, check_tokens, text_field, log)
            write_json(tmp / PLUGGED_MANIFEST, dump(plugged.model_copy(update={"check": check})))
    return Path(out_dir)


def plug_check(model_dir: str | Path, plugged_dir: str | Path, check_data: str | Path, check_tokens: int | None,
               text_field: str = "text", log=None) -> PlugCheck:
    """Score the full model and the plugged one on the owner's public text; warn when the plug-in is worse."""
    from offsite_ds.calibrate import DEFAULT_CALIB_TOKENS, calibration_ids, calibration_seq_len, mean_nll
    from offsite_ds.runtime import load_model

    model = load_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids, facts = calibration_ids(check_data, tokenizer, check_tokens or DEFAULT_CALIB_TOKENS, text_field)
    seq_len = calibration_seq_len(model)
    full_ppl = math.exp(mean_nll(model, ids, seq_len))
    del model
    plugged_ppl = math.exp(mean_nll(load_model_dir(plugged_dir)[0], ids, seq_len))
    if plugged_ppl > full_ppl:
        (log or (lambda line: print(line, file=sys.stderr)))(
            f"warning: the plug-in's perplexity on {check_data} is {plugged_ppl:.2f}, worse than the full model's "
            f"zero-shot {full_ppl:.2f}: the adapter did not transfer here - rebuild the emulator (larger K, another "
            "--select, distillation) or serve the full model")
    return PlugCheck(**facts, full_ppl=full_ppl, plugged_ppl=plugged_ppl, ratio=plugged_ppl / full_ppl)


def load_model_dir(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load any model directory the toolkit writes: a bundle (validated), a plugged model, a plain HF dir.

    A plugged model tuned with Houlsby adapters carries modules plain `from_pretrained` does not know;
    they are re-inserted here before the weights load.
    """
    from offsite_ds.bundle import load_bundle
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.runtime import require_model_dir
    from offsite_ds.validation import MAX_MANIFEST_BYTES

    path = require_model_dir(directory)
    fmt, manifest = None, None
    if os.path.lexists(path / PLUGGED_MANIFEST):  # read without following links: it may be a hostile bundle
        raw = read_json_listed(path, PLUGGED_MANIFEST, MAX_MANIFEST_BYTES)
        fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt == BUNDLE_FORMAT:
        bundle = load_bundle(path, dtype=dtype)
        return bundle.model, bundle.tokenizer
    if fmt == PLUGGED_FORMAT:
        manifest = parse_manifest(raw, PLUGGED_FORMAT, str(path))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if manifest is not None and manifest.mode == "adapter":
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        apply_mode(model, manifest.adapter_blocks, "adapter", manifest.mode_settings)
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(read_safetensors(path, file.name))
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
