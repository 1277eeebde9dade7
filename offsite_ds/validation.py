"""Validation of untrusted artifacts: manifests, listed files, safetensors and model configs as JSON.

Whatever arrives across the owner / data-owner boundary is read here first, bounded and checked before
anything sized by it is allocated; the bundle and the package loaders share these checks (and the
caps) so that both refuse the same things the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from offsite_ds.artifact_files import check_file, check_tree, read_json_listed, safetensors_header
from offsite_ds.errors import ArtifactError
from offsite_ds.families import Family
from offsite_ds.formats import SAFETENSORS_NAMES, WEIGHTS_INDEX
from offsite_ds.manifests import MANIFEST, AdapterManifest, BundleManifest, decode_json, parse_manifest

MAX_MANIFEST_BYTES = 4 << 20
MAX_JSON_BYTES = 1 << 20  # config.json, tokenizer_config.json, generation_config.json, shard index
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json of a 256k vocabulary is ~20 MB
BUNDLE_JSON = {"config.json": MAX_JSON_BYTES, "generation_config.json": MAX_JSON_BYTES,
               "tokenizer.json": MAX_TOKENIZER_BYTES, "tokenizer_config.json": MAX_TOKENIZER_BYTES,
               "special_tokens_map.json": MAX_JSON_BYTES, WEIGHTS_INDEX: MAX_TOKENIZER_BYTES}
CHAT_TEMPLATE = "chat_template.jinja"  # text rendered by transformers' sandboxed jinja, never imported
# config sizes that make from_pretrained allocate; refused above these before any model is built
CONFIG_CAPS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "n_embd": 1 << 16, "word_embed_proj_dim": 1 << 16,
               "intermediate_size": 1 << 18, "ffn_dim": 1 << 18, "n_inner": 1 << 18, "num_attention_heads": 1024,
               "n_head": 1024, "num_key_value_heads": 1024, "head_dim": 4096, "max_position_embeddings": 1 << 22,
               "n_positions": 1 << 22, "d_model": 1 << 16, "n_heads": 1024, "num_kv_heads": 1024,
               "max_seq_len": 1 << 22, "expansion_ratio": 64}
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "n_layers")  # MPT names its depth n_layers


def read_manifest(directory: str | Path, expected_format: str) -> BundleManifest | AdapterManifest:
    """Read offsite.json (bounded, no links) and parse it into its typed class (`offsite_ds.manifests`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; pass the artifact directory")
    if not os.path.lexists(directory / MANIFEST):
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an offsite-ds artifact (expected {expected_format})")
    raw = read_json_listed(directory, MANIFEST, MAX_MANIFEST_BYTES)
    return parse_manifest(raw, expected_format, str(directory))


def verify_files(directory: Path, manifest: BundleManifest | AdapterManifest) -> None:
    """Every listed file present, a regular file of its stated size with its stated hash; no pickle, no stowaways."""
    check_tree(directory, set(manifest.files))
    for rel, entry in manifest.files.items():
        check_file(directory, rel, entry.bytes, entry.sha256)


def read_safetensors(directory: Path, rel: str, expected: dict[str, tuple[list[int], str]] | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Check the header (ours, before safetensors reads it) against `expected` {name: (shape, dtype)}, then
    load the tensors (safetensors never executes code) and refuse NaN/Inf."""
    spans = safetensors_header(directory, rel)
    path = directory / rel
    if expected is not None:
        missing = sorted(set(expected) - set(spans))
        extra = sorted(set(spans) - set(expected))
        if missing:
            raise ArtifactError(f"{path}: missing tensor '{missing[0]}' (+{len(missing) - 1} more) listed in {MANIFEST}")
        if extra:
            raise ArtifactError(f"{path}: unexpected tensor {extra[0][:80]!r} (+{len(extra) - 1} more) not in {MANIFEST}")
        for name, (shape, dtype) in expected.items():
            span = spans[name]
            if list(span.shape) != list(shape) or SAFETENSORS_NAMES.get(span.dtype) != dtype:
                raise ArtifactError(f"{path}: tensor '{name}' is {list(span.shape)} {span.dtype}, {MANIFEST} says "
                                    f"{list(shape)} {dtype}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: tensor '{name}' holds NaN or Inf values; refusing it")
    return tensors


# --------------------------------------------------------------------------- model config (as JSON)

def no_code_or_paths(obj: dict, where: str) -> None:
    """Refuse keys that make transformers import code (auto_map) or read a file named inside the JSON."""
    bad = [k for k in obj if k == "auto_map" or k.endswith(("_file", "_files")) or k == "trust_remote_code"]
    if bad:
        raise ArtifactError(f"{where}: key '{bad[0][:60]}' is not allowed (remote code or a file path); refusing it")


def check_model_config(config: object, where: str, family: Family, depth: int) -> None:
    """A config.json (decoded JSON) that describes a `depth`-block model of `family` with sane sizes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(config, dict):
        raise ArtifactError(f"{where} is not a JSON object")
    no_code_or_paths(config, where)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in family.model_types or model_type not in CONFIG_MAPPING:
        raise ArtifactError(f"{where}: model_type {str(model_type)[:40]!r} is not a supported {family.name} model type")
    depths = [config[k] for k in DEPTH_KEYS if k in config]
    if not depths or any(type(d) is not int or d != depth for d in depths):
        raise ArtifactError(f"{where}: num_hidden_layers {depths[:1]} is not the expected {depth}")
    for key, cap in CONFIG_CAPS.items():
        value = config.get(key)
        if value is not None and (type(value) is not int or not 1 <= value <= cap):
            raise ArtifactError(f"{where}: {key} {str(value)[:30]} is outside 1..{cap}; refusing it")


def meta_model(config: dict, dtype: torch.dtype, where: str) -> torch.nn.Module:
    """The model a (checked) config describes, built on the meta device: shapes without allocation."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        cfg = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise ArtifactError(f"{where}: does not describe a buildable model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else ''})")


def read_model_config(model_dir: str | Path) -> dict:
    """The owner's config.json read as JSON (bounded), before any model is loaded."""
    from offsite_ds.runtime import require_model_dir

    path = require_model_dir(model_dir) / "config.json"
    with open(path, "rb") as f:  # the owner's own directory: links allowed (a hub cache snapshot is all links)
        return decode_json(f.read(MAX_JSON_BYTES + 1)[:MAX_JSON_BYTES], str(path))
