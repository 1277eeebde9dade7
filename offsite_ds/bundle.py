"""The two artifacts that cross the owner / data-owner boundary: EmulatorBundle and AdapterPackage.

Both are directories of safetensors + JSON, described by `offsite.json`. Wherever they arrive they are
untrusted: the manifest is checked field by field, every listed file by size and then SHA-256, pickle
files are refused outright, and tensors are checked for names, shapes, dtypes and finiteness.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offsite_ds.artifact_files import check_file, check_tree, read_json_listed, safetensors_header
from offsite_ds.atomic import atomic_dir, write_json
from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.families import Family
from offsite_ds.formats import (MAX_HEADER_BYTES, SAFETENSORS_NAMES, SHARD, SINGLE_WEIGHTS, WEIGHT_DTYPES,
                                WEIGHTS_INDEX, dtype_name)
from offsite_ds.manifests import (ADAPTER_FORMAT, BUNDLE_FORMAT, FORMAT_VERSION, MANIFEST,
                                  AdapterManifest, BundleManifest, decode_json, dump,
                                  parse_manifest)
from offsite_ds.zero3 import full_shape

ADAPTER_WEIGHTS = "adapter.safetensors"
PEFT_DIR = "peft"
PEFT_FILES = (f"{PEFT_DIR}/adapter_config.json", f"{PEFT_DIR}/adapter_model.safetensors")
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before a tensor's name in adapter_model.safetensors
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
               "n_positions": 1 << 22}
DEPTH_KEYS = ("num_hidden_layers", "n_layer")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fingerprint(entries, sample_bytes: int) -> str:
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


def fingerprint_checkpoint(checkpoint, sample_bytes: int = 1 << 16) -> str:
    """`fingerprint_model` of the model a directory holds, read from its shards (a few KB per tensor).

    `checkpoint` is a shards.ModelCheckpoint; equal to fingerprint_model(runtime.load_model(dir)).
    """
    reader = checkpoint.reader

    def entry(name):
        source = checkpoint.source(name)
        return (name, checkpoint.shapes[name], reader.dtype(source), math.prod(reader.shape(source)),
                lambda a, b: reader.read_flat(source, a, b))

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
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------- validation

def read_manifest(directory: str | Path, expected_format: str):
    """Read offsite.json (bounded, no links) and parse it into its typed class (`offsite_ds.manifests`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; pass the artifact directory")
    if not os.path.lexists(directory / MANIFEST):
        raise ArtifactError(f"{directory} has no {MANIFEST}: not an offsite-ds artifact (expected {expected_format})")
    raw = read_json_listed(directory, MANIFEST, MAX_MANIFEST_BYTES)
    return parse_manifest(raw, expected_format, str(directory))


def verify_files(directory: Path, manifest) -> None:
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

def _no_code_or_paths(obj: dict, where: str) -> None:
    """Refuse keys that make transformers import code (auto_map) or read a file named inside the JSON."""
    bad = [k for k in obj if k == "auto_map" or k.endswith(("_file", "_files")) or k == "trust_remote_code"]
    if bad:
        raise ArtifactError(f"{where}: key '{bad[0][:60]}' is not allowed (remote code or a file path); refusing it")


def check_model_config(config, where: str, family: Family, depth: int) -> None:
    """A config.json (decoded JSON) that describes a `depth`-block model of `family` with sane sizes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(config, dict):
        raise ArtifactError(f"{where} is not a JSON object")
    _no_code_or_paths(config, where)
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


# ------------------------------------------------------------------------------------- EmulatorBundle

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

    def _positions(self) -> list[int]:
        """The stored block each executed position runs (the identity unless the bundle shares blocks)."""
        return self.manifest.share_map or list(range(len(self.manifest.block_map)))


def save_bundle(model, tokenizer, manifest: dict, out_dir: str | Path) -> Path:
    """Write an EmulatorBundle: a plain HF model dir (safetensors) + tokenizer + offsite.json (typed)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_bundle(write, manifest, out_dir)


def write_bundle(write: Callable[[Path], None], manifest: dict, out_dir: str | Path) -> Path:
    """Atomically write an EmulatorBundle whose model files `write(tmp_dir)` produces, then its offsite.json.

    The manifest lists every file `write` left (weights, shards and their index, config, tokenizer).
    """
    with atomic_dir(out_dir) as tmp:
        write(tmp)
        files = describe_files(tmp)
        full = BundleManifest.model_validate({"format": BUNDLE_FORMAT, "version": FORMAT_VERSION, **manifest,
                                              "files": files, "fingerprint": files_fingerprint(files)})
        write_json(tmp / MANIFEST, dump(full))
    return Path(out_dir)


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
            _no_code_or_paths(obj, f"{directory}/{rel}")
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
    if manifest.share_map is not None:  # validated with the manifest: expand the stored blocks
        from offsite_ds.surgery import share_blocks

        share_blocks(model, manifest.share_map)
    try:  # tokenizers' Rust parser raises a bare Exception for JSON it does not accept
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ArtifactError(f"{directory}: the tokenizer files do not load ({type(exc).__name__}: {_first_line(exc)})")
    return Bundle(directory, model.eval(), tokenizer, manifest)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [""])[0][:160]


# ------------------------------------------------------------------------------------ AdapterPackage

@dataclass
class AdapterPackage:
    path: Path
    tensors: dict[str, torch.Tensor]
    manifest: AdapterManifest

    @property
    def mode(self) -> str:
        return self.manifest.mode


def tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
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


def block_linears(block: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Name -> (in, out) of every linear layer inside a block (nn.Linear and GPT-2's Conv1D)."""
    from offsite_ds.families import is_transposed_linear

    out = {}
    for name, m in block.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif is_transposed_linear(m):  # stores [in, out]
            out[name] = tuple(m.weight.shape)
    return out


def expected_adapter_tensors(manifest: AdapterManifest, config: dict, dtype: torch.dtype, where: str
                             ) -> dict[str, tuple[list[int], str]]:
    """The tensors a package must hold for a model of `config`: its own settings bounded by the model's
    sizes first (LoRA r, bottleneck, targets), then the mode applied to a meta-device model."""
    from offsite_ds.families import family_of, get_path
    from offsite_ds.peft_modes import apply_mode, trainable_state

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
        hidden = linears.get(family.attn_out, (0, 0))[1]
        if (settings.bottleneck or 0) > hidden:
            raise ArtifactError(f"{where}: bottleneck {settings.bottleneck} exceeds the hidden size {hidden}")
    try:
        with torch.device("meta"):
            apply_mode(meta, manifest.adapter_blocks, manifest.mode, settings.model_dump())
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
        _no_code_or_paths(peft_config, f"{where}/{PEFT_FILES[0]}")
    return AdapterPackage(directory, tensors, manifest)
