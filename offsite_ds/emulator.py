"""Build the emulator: the same HF class with fewer blocks, so plain `from_pretrained` loads it.

Uniform layer-drop of the middle is the paper's method; magnitude pruning and int8 fake-quantisation of
the kept middle blocks exist for the paper's compression ablation (Figure 4).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoTokenizer, PreTrainedModel

from offsite_ds.errors import OffsiteError
from offsite_ds.families import family_of, get_path, set_path
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
def magnitude_prune_(module: nn.Module, ratio: float) -> None:
    """Zero the `ratio` smallest-magnitude entries of every weight matrix (unstructured, per matrix)."""
    for param in module.parameters():
        if param.dim() < 2 or ratio <= 0:
            continue
        k = int(param.numel() * ratio)
        if k == 0:
            continue
        threshold = param.abs().flatten().kthvalue(k).values
        param.masked_fill_(param.abs() <= threshold, 0.0)


@torch.no_grad()
def fake_quantize_(module: nn.Module, bits: int) -> None:
    """Symmetric per-output-channel quantise-dequantise of every weight matrix (stored back as floats)."""
    qmax = 2 ** (bits - 1) - 1
    for param in module.parameters():
        if param.dim() < 2:
            continue
        scale = param.abs().amax(dim=tuple(range(1, param.dim())), keepdim=True).clamp(min=1e-12) / qmax
        param.copy_((param / scale).round().clamp(-qmax, qmax) * scale)


def build_emulator(model: PreTrainedModel, layout: Layout, method: str = "drop", prune_ratio: float = 0.5,
                   quant_bits: int = 8) -> tuple[PreTrainedModel, list[int]]:
    """Emulator of `model` for `layout`; returns it with its block map (emulator position -> original index)."""
    if method not in METHODS:
        raise OffsiteError(f"unknown compression method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "prune" and not 0.0 < prune_ratio < 1.0:
        raise OffsiteError(f"--prune-ratio {prune_ratio} must be in (0, 1)")
    if method == "quantize" and not 2 <= quant_bits <= 16:
        raise OffsiteError(f"--bits {quant_bits} must be between 2 and 16")
    family = family_of(model)
    n_layers = len(get_path(model, family.blocks))
    block_map = emulator_block_map(n_layers, layout)
    emulator = select_blocks(model, block_map)
    middle = get_path(emulator, family.blocks)[layout.bottom: layout.bottom + layout.kept]
    if method == "prune":
        magnitude_prune_(middle, prune_ratio)
    elif method == "quantize":
        fake_quantize_(middle, quant_bits)
    return emulator, block_map


def make_bundle(model_dir: str | Path, layout_spec: str, out_dir: str | Path, keep_ratio: float | None = None,
                method: str = "drop", prune_ratio: float = 0.5, quant_bits: int = 8) -> Path:
    """Model owner's `emulate`: full model dir -> EmulatorBundle dir."""
    from offsite_ds.bundle import fingerprint_model, save_bundle
    from offsite_ds.runtime import load_model

    model = load_model(model_dir)
    family = family_of(model)
    n_layers = len(get_path(model, family.blocks))
    layout = parse_layout(layout_spec, n_layers, keep_ratio)
    emulator, block_map = build_emulator(model, layout, method, prune_ratio, quant_bits)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    compression = {"method": method, "kept": layout.kept, "middle": n_layers - layout.bottom - layout.top,
                   "distilled": False}
    if method == "prune":
        compression["prune_ratio"] = prune_ratio
    if method == "quantize":
        compression["bits"] = quant_bits
    manifest = {
        "family": family.name,
        "model_type": model.config.model_type,
        "base_depth": n_layers,
        "base_fingerprint": fingerprint_model(model),
        "layout": str(layout),
        "block_map": block_map,
        "adapter_positions": emulator_adapter_positions(layout),
        "compression": compression,
    }
    return save_bundle(emulator, tokenizer, manifest, out_dir)
