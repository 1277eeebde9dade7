"""Build the emulator: the same HF class with fewer blocks, so plain `from_pretrained` loads it.

Uniform layer-drop of the middle is the paper's method; magnitude pruning and int8 fake-quantisation of
the kept middle blocks exist for the paper's compression ablation (Figure 4).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoTokenizer, PreTrainedModel

from offsite_ds.errors import OffsiteError
from offsite_ds.families import block_prefix, family_of, get_path, set_path
from offsite_ds.shards import DEFAULT_SHARD_BYTES, ModelCheckpoint, ShardWriter
from offsite_ds.sandwich import Layout, emulator_adapter_positions, emulator_block_map, parse_layout

METHODS = ("drop", "prune", "quantize")


def _renumber_layer_idx(block: nn.Module, position: int) -> None:
    """Attention modules carry their block index for the KV cache; it must follow the new position."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = position


def set_depth(config, block_map: list[int]) -> None:
    """Shrink a config to the chosen blocks, including per-layer lists such as `layer_types`."""
    config.num_hidden_layers = len(block_map)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) > max(block_map):
        config.layer_types = [layer_types[i] for i in block_map]


def select_blocks(model: PreTrainedModel, block_map: list[int]) -> PreTrainedModel:
    """A copy of `model` that holds only the blocks in `block_map` (in that order).

    Only the non-block parts and the chosen blocks are copied, so a 7B owner model is never doubled.
    """
    family = family_of(model)
    blocks = get_path(model, family.blocks)
    set_path(model, family.blocks, nn.ModuleList())
    try:
        emulator = copy.deepcopy(model)
    finally:
        set_path(model, family.blocks, blocks)
    chosen = nn.ModuleList(copy.deepcopy(blocks[i]) for i in block_map)
    for position, block in enumerate(chosen):
        _renumber_layer_idx(block, position)
    set_path(emulator, family.blocks, chosen)
    emulator.config = copy.deepcopy(model.config)
    set_depth(emulator.config, block_map)
    emulator.tie_weights()
    return emulator


@torch.no_grad()
def prune_tensor(tensor: torch.Tensor, ratio: float) -> torch.Tensor:
    """`tensor` with its `ratio` smallest-magnitude entries zeroed (unstructured); vectors pass through."""
    if tensor.dim() < 2 or ratio <= 0:
        return tensor
    k = int(tensor.numel() * ratio)
    if k == 0:
        return tensor
    work = tensor if tensor.dtype == torch.float32 else tensor.float()  # kthvalue needs fp32 on CPU for bf16
    threshold = work.abs().flatten().kthvalue(k).values
    return work.masked_fill(work.abs() <= threshold, 0.0).to(tensor.dtype)


@torch.no_grad()
def quantize_tensor(tensor: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel quantise-dequantise of a weight matrix (returned as floats)."""
    if tensor.dim() < 2:
        return tensor
    qmax = 2 ** (bits - 1) - 1
    work = tensor if tensor.dtype == torch.float32 else tensor.float()
    scale = work.abs().amax(dim=tuple(range(1, work.dim())), keepdim=True).clamp(min=1e-12) / qmax
    return ((work / scale).round().clamp(-qmax, qmax) * scale).to(tensor.dtype)


def compression_transform(method: str, prune_ratio: float = 0.5, quant_bits: int = 8):
    """The per-tensor form of a compression method (None for plain layer-drop), checked."""
    if method not in METHODS:
        raise OffsiteError(f"unknown compression method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "prune" and not 0.0 < prune_ratio < 1.0:
        raise OffsiteError(f"--prune-ratio {prune_ratio} must be in (0, 1)")
    if method == "quantize" and not 2 <= quant_bits <= 16:
        raise OffsiteError(f"--bits {quant_bits} must be between 2 and 16")
    if method == "prune":
        return lambda t: prune_tensor(t, prune_ratio)
    if method == "quantize":
        return lambda t: quantize_tensor(t, quant_bits)
    return None


def build_emulator(model: PreTrainedModel, layout: Layout, method: str = "drop", prune_ratio: float = 0.5,
                   quant_bits: int = 8) -> tuple[PreTrainedModel, list[int]]:
    """Emulator of `model` for `layout`; returns it with its block map (emulator position -> original index)."""
    transform = compression_transform(method, prune_ratio, quant_bits)
    family = family_of(model)
    n_layers = len(get_path(model, family.blocks))
    block_map = emulator_block_map(n_layers, layout)
    emulator = select_blocks(model, block_map)
    middle = get_path(emulator, family.blocks)[layout.bottom: layout.bottom + layout.kept]
    if transform is not None:
        with torch.no_grad():
            for param in middle.parameters():
                param.copy_(transform(param))
    return emulator, block_map


def write_emulator(model_dir: str | Path | ModelCheckpoint, block_map: list[int], out_dir: str | Path,
                   dtype: torch.dtype | None = None,
                   transform: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> torch.dtype:
    """Write the emulator of `model_dir` for `block_map` into `out_dir`, streamed from the checkpoint.

    Embeddings, head, final norm and the blocks in `block_map` are read one tensor at a time and written
    straight to bounded shards, blocks renamed to their emulator positions, so memory stays at about one
    tensor whatever the model's size. `transform(position, name, tensor)` is applied to every block
    parameter (the compression of the middle); floating tensors are written in `dtype` (default: the
    checkpoint's own). Also writes config.json at the new depth, the generation config and
    the tokenizer. Returns the dtype written.
    """
    checkpoint = model_dir if isinstance(model_dir, ModelCheckpoint) else ModelCheckpoint(model_dir)
    depth = checkpoint.depth
    if not block_map or list(block_map) != sorted(set(block_map)) or not 0 <= block_map[0] <= block_map[-1] < depth:
        raise OffsiteError(f"block_map {block_map} must list strictly increasing block indices of the "
                           f"{depth}-block model")
    dtype = dtype or checkpoint.dtype()
    position_of = {original: position for position, original in enumerate(block_map)}
    jobs = []  # (checkpoint name, emulator name, position or None), in storage order
    for original in checkpoint.stored:
        where = checkpoint.block_of(original)
        if where is None:
            jobs.append((original, original, None))
        elif where[0] in position_of:
            position = position_of[where[0]]
            jobs.append((original, f"{block_prefix(checkpoint.family, position)}{where[1]}", position))

    def out_dtype(original: str) -> torch.dtype:
        stored = checkpoint.reader.dtype(checkpoint.source(original))
        return dtype if stored.is_floating_point else stored

    writer = ShardWriter(out_dir, [(name, checkpoint.shapes[original], out_dtype(original))
                                   for original, name, _ in jobs], max_shard_bytes)
    for original, name, position in jobs:
        tensor = checkpoint.get(original)
        if position is not None and transform is not None and original in checkpoint.parameters:
            tensor = transform(position, checkpoint.block_of(original)[1], tensor)
        writer.add(name, tensor.to(out_dtype(original)))
        del tensor
    writer.close()
    config = copy.deepcopy(checkpoint.config)
    set_depth(config, list(block_map))
    write_model_files(checkpoint, config, dtype, Path(out_dir))
    return dtype


def write_model_files(checkpoint: ModelCheckpoint, config, dtype: torch.dtype, out_dir: Path) -> None:
    """Everything of a model dir but the weights: config.json (with `dtype`), generation config, tokenizer."""
    from transformers import GenerationConfig

    config.dtype = dtype
    config.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(checkpoint.dir, local_files_only=True)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(checkpoint.dir, local_files_only=True).save_pretrained(out_dir)


def make_bundle(model_dir: str | Path, layout_spec: str, out_dir: str | Path, keep_ratio: float | None = None,
                method: str = "drop", prune_ratio: float = 0.5, quant_bits: int = 8,
                dtype: torch.dtype | str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Model owner's `emulate`: full model dir -> EmulatorBundle dir, streamed (the model is never loaded).

    The bundle keeps the checkpoint's dtype (a bf16 model gives a bf16 bundle) unless `dtype` is given.
    """
    from offsite_ds.bundle import fingerprint_checkpoint, write_bundle

    transform = compression_transform(method, prune_ratio, quant_bits)
    dtype = parse_dtype(dtype)
    checkpoint = ModelCheckpoint(model_dir)
    n_layers = checkpoint.depth
    layout = parse_layout(layout_spec, n_layers, keep_ratio)
    block_map = emulator_block_map(n_layers, layout)
    middle = range(layout.bottom, layout.bottom + layout.kept)
    compression = {"method": method, "kept": layout.kept, "middle": n_layers - layout.bottom - layout.top,
                   "distilled": False}
    if method == "prune":
        compression["prune_ratio"] = prune_ratio
    if method == "quantize":
        compression["bits"] = quant_bits
    dtype = dtype or checkpoint.dtype()

    def write(tmp: Path) -> None:
        per_tensor = None if transform is None else (
            lambda position, _name, tensor: transform(tensor) if position in middle else tensor)
        write_emulator(checkpoint, block_map, tmp, dtype, per_tensor, max_shard_bytes)

    manifest = {
        "family": checkpoint.family.name,
        "model_type": checkpoint.config.model_type,
        "base_depth": n_layers,
        "base_fingerprint": fingerprint_checkpoint(checkpoint),
        "layout": str(layout),
        "block_map": block_map,
        "adapter_positions": emulator_adapter_positions(layout),
        "compression": compression,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return write_bundle(write, manifest, out_dir)


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """'bfloat16' / torch.bfloat16 / None (keep the checkpoint's) -> torch dtype, checked."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise OffsiteError(f"--dtype {dtype} is not one of {', '.join(DTYPE_NAMES)}")
