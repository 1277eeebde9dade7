"""The EmulatorBundle: the owner's compressed emulator, written for the data owner and loaded by them.

A plain Hugging Face model directory (safetensors, config, tokenizer) plus `offsite.json`. It arrives
untrusted: `check_bundle` runs the shared validation (`offsite_ds.validation`) on every file before
`load_bundle` lets transformers read any of them.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from offsite_ds.artifact_files import read_json_listed, safetensors_header
from offsite_ds.atomic import atomic_dir, write_json
from offsite_ds.errors import ArtifactError
from offsite_ds.fingerprints import describe_files, files_fingerprint
from offsite_ds.formats import SAFETENSORS_NAMES, SHARD, SINGLE_WEIGHTS, WEIGHT_DTYPES, WEIGHTS_INDEX
from offsite_ds.manifests import BUNDLE_FORMAT, FORMAT_VERSION, MANIFEST, BundleManifest, dump
from offsite_ds.validation import (BUNDLE_JSON, CHAT_TEMPLATE, check_model_config, meta_model, no_code_or_paths,
                                   read_manifest, verify_files)


@dataclass
class Bundle:
    path: Path
    model: torch.nn.Module
    tokenizer: object
    manifest: BundleManifest

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def block_map(self) -> list[int]:
        """Original block index of each position the loaded model RUNS (a shared bundle repeats kept blocks)."""
        stored = self.manifest.block_map
        return [stored[s] for s in self._positions()]

    @property
    def adapter_positions(self) -> list[int]:
        """Positions of the adapter blocks in the loaded model (a shared bundle runs at the original depth)."""
        stored = set(self.manifest.adapter_positions)
        return [p for p, s in enumerate(self._positions()) if s in stored]

    @property
    def position_to_original(self) -> dict[int, int]:
        """Adapter block position in the loaded model -> its original block index: the renaming between a
        tuned emulator's tensors and the full model's (tune exports through it, apply_to_emulator inverts it)."""
        block_map = self.block_map
        return {p: block_map[p] for p in self.adapter_positions}

    def _positions(self) -> list[int]:
        """The stored block each executed position runs (the identity unless the bundle shares blocks)."""
        return self.manifest.share_map or list(range(len(self.manifest.block_map)))


@dataclass(frozen=True)
class WrittenBundle:
    """A bundle just written: its directory and the validated manifest it holds, so that the writer's caller
    (emulate's summary line) need not read back what it wrote."""
    path: Path
    manifest: BundleManifest


def save_bundle(model, tokenizer, manifest: dict, out_dir: str | Path) -> WrittenBundle:
    """Write an EmulatorBundle: a plain HF model dir (safetensors) + tokenizer + offsite.json (typed)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_bundle(write, manifest, out_dir)


def write_bundle(write: Callable[[Path], None], manifest: dict, out_dir: str | Path) -> WrittenBundle:
    """Atomically write an EmulatorBundle whose model files `write(tmp_dir)` produces, then its offsite.json.

    The manifest lists every file `write` left (weights, shards and their index, config, tokenizer).
    """
    with atomic_dir(out_dir) as tmp:
        write(tmp)
        files = describe_files(tmp)
        full = BundleManifest.model_validate({"format": BUNDLE_FORMAT, "version": FORMAT_VERSION, **manifest,
                                              "files": files, "fingerprint": files_fingerprint(files)})
        write_json(tmp / MANIFEST, dump(full))
    return WrittenBundle(Path(out_dir), full)


def _bundle_weights(directory: Path, files: dict) -> list[str]:
    """The weight files of a bundle: one model.safetensors, or shards with an index naming exactly them."""
    shards = sorted(f for f in files if SHARD.fullmatch(f))
    weights = [SINGLE_WEIGHTS] if SINGLE_WEIGHTS in files else []
    if bool(weights) == bool(shards) or bool(shards) != (WEIGHTS_INDEX in files):
        raise ArtifactError(f"{directory}: a bundle holds either {SINGLE_WEIGHTS} or model-*-of-*.safetensors shards "
                            f"with "
                            f"{WEIGHTS_INDEX}; re-export it")
    return weights or shards


def check_bundle(directory: str | Path) -> BundleManifest:
    """Validate a bundle without loading the model: manifest, files, config, tokenizer, weight headers.

    Each check is bounded by the listed files' sizes; the config is compared with the tensors in the
    headers (on a meta-device model) so that from_pretrained allocates nothing the files do not hold.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, BUNDLE_FORMAT)
    files = manifest.files
    weights = _bundle_weights(directory, files)
    for rel in files:
        if rel not in BUNDLE_JSON and rel != CHAT_TEMPLATE and rel not in weights:
            raise ArtifactError(f"{directory}: '{rel}' is not a file a bundle may hold (config, tokenizer JSON, "
                                "safetensors weights)")
    for rel in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if rel not in files:
            raise ArtifactError(f"{directory}: no {rel}; the bundle is incomplete")
    if manifest.fingerprint != files_fingerprint({k: v.model_dump() for k, v in files.items()}):
        raise ArtifactError(f"{directory}: bundle fingerprint does not match its file list; re-export it")
    verify_files(directory, manifest)
    decoded = {rel: read_json_listed(directory, rel, BUNDLE_JSON[rel]) for rel in files if rel in BUNDLE_JSON}
    for rel, obj in decoded.items():
        if not isinstance(obj, dict):
            raise ArtifactError(f"{directory}/{rel} is not a JSON object; re-export the bundle")
        if rel != "tokenizer.json":
            no_code_or_paths(obj, f"{directory}/{rel}")
    if not isinstance(decoded["tokenizer.json"].get("model"), dict):
        raise ArtifactError(f"{directory}/tokenizer.json has no tokenizer model; re-export the bundle")
    tok_class = decoded["tokenizer_config.json"].get("tokenizer_class")
    if tok_class is not None and not (isinstance(tok_class, str) and re.fullmatch(r"[A-Za-z0-9_]{1,64}", tok_class)):
        raise ArtifactError(f"{directory}/tokenizer_config.json: tokenizer_class is not a class name")
    config = decoded["config.json"]
    where = f"{directory}/config.json"
    check_model_config(config, where, manifest.family_spec, len(manifest.block_map))
    _check_weights(directory, weights, decoded.get(WEIGHTS_INDEX), meta_model(config, torch.float32, where))
    return manifest


def _check_weights(directory: Path, weights: list[str], index: dict | None, meta: torch.nn.Module) -> None:
    """Every tensor in the headers is one the config's model has, with its shape (tied copies may be absent)."""
    spans = {}
    for rel in weights:
        for name, span in safetensors_header(directory, rel).items():
            if name in spans:
                raise ArtifactError(f"{directory}: tensor {name[:80]!r} appears in two shards")
            spans[name] = (rel, span)
    if index is not None:
        weight_map = index.get("weight_map")
        if (not isinstance(weight_map, dict) or set(weight_map) != set(spans)
                or any(weight_map[n] != rel for n, (rel, _) in spans.items())):
            raise ArtifactError(f"{directory}/{WEIGHTS_INDEX}: weight_map does not name exactly the shards' tensors")
    expected = {n: tuple(t.shape) for n, t in meta.state_dict().items()}
    tied = set(getattr(meta, "_tied_weights_keys", None) or ()) if getattr(meta.config, "tie_word_embeddings",
                                                                          False) else set()
    for name, (rel, span) in spans.items():
        if name not in expected:
            raise ArtifactError(f"{directory}/{rel}: tensor {name[:80]!r} is not a parameter of the model config.json "
                                "describes")
        if span.shape != expected[name] or SAFETENSORS_NAMES.get(span.dtype) not in WEIGHT_DTYPES:
            raise ArtifactError(f"{directory}/{rel}: tensor '{name}' is {list(span.shape)} {span.dtype}, config.json "
                                f"needs {list(expected[name])} in a float dtype")
    missing = sorted(set(expected) - set(spans) - tied)
    if missing:
        raise ArtifactError(f"{directory}: the weights lack '{missing[0]}' (+{len(missing) - 1} more) that "
                            "config.json's model has")


def load_bundle(directory: str | Path, dtype: torch.dtype = torch.float32) -> Bundle:
    """Validate, then load the emulator model (safetensors only) and its tokenizer.

    The one loader of every bundle: a shared (CRaSh) bundle stores each kept block once plus `share_map`,
    and is expanded here to its executed depth (plain `from_pretrained` would run the stored blocks only).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offsite_ds.families import blocks_of, family_of

    directory = Path(directory)
    manifest = check_bundle(directory)
    try:  # every input was checked above; a refusal by transformers itself is still one line
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True,
                                                     local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ArtifactError(f"{directory}: the model does not load ({type(exc).__name__}: {_first_line(exc)})")
    family = family_of(model)
    if family.name != manifest.family:
        raise ArtifactError(f"{directory}: manifest says family '{manifest.family}' but the model is '{family.name}'")
    if len(blocks_of(model)) != len(manifest.block_map):
        raise ArtifactError(f"{directory}: the model has {len(blocks_of(model))} blocks but block_map lists "
                            f"{len(manifest.block_map)}; the bundle is inconsistent")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise ArtifactError(f"{directory}: weight '{name}' holds NaN or Inf values; refusing the bundle")
    if manifest.compression.mlp_width is not None:
        _narrow_middle(directory, model, family, manifest)
    if manifest.share_map is not None:  # validated with the manifest: expand the stored blocks
        from offsite_ds.surgery import share_blocks

        share_blocks(model, manifest.share_map)
    try:  # tokenizers' Rust parser raises a bare Exception for JSON it does not accept
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ArtifactError(f"{directory}: the tokenizer files do not load ({type(exc).__name__}: {_first_line(exc)})")
    return Bundle(directory, model.eval(), tokenizer, manifest)


def _narrow_middle(directory: Path, model: torch.nn.Module, family, manifest: BundleManifest) -> None:
    """Run the middle blocks of an `--mlp-width` bundle at their narrow width: stored zero-padded (a plain HF
    directory), they would otherwise cost the data owner full-width blocks every step for zeros."""
    from offsite_ds.families import blocks_of
    from offsite_ds.narrow import drop_dead_channels, mlp_width

    record, blocks, adapter = manifest.compression.mlp_width, blocks_of(model), set(manifest.adapter_positions)
    for position in sorted(set(range(len(blocks))) - adapter):
        width = mlp_width(blocks[position], family)
        if width != record.full_width:
            raise ArtifactError(f"{directory}: middle block {position} has {width} MLP channels, not "
                                f"compression.mlp_width.full_width {record.full_width}; re-export it")
        kept = drop_dead_channels(blocks[position], family)
        if kept > record.width:
            raise ArtifactError(f"{directory}: middle block {position} has {kept} live MLP channels, more than "
                                f"compression.mlp_width.width {record.width}; the bundle is inconsistent, re-export it")


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [""])[0][:160]
