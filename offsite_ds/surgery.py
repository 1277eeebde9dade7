"""Model surgery: blocks selected, repeated (shared) and renumbered, and a model's depth changed to match.

A leaf below the emulator builders, calibration and bundle loading, which all reshape a model's block list:
it knows the architecture table (`families`) and nothing above it, so none of them imports another for it.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from offsite_ds.families import family_of, get_path, set_path


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


def model_configs(model: nn.Module) -> list:
    """Every distinct config object inside a model (an HF wrapper and its base model may hold different ones)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            configs[id(config)] = config
    return list(configs.values())


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


def share_blocks(model: PreTrainedModel, share_map: list[int]) -> None:
    """Expand a shared (CRaSh) emulator in place: executed position p runs stored block share_map[p].

    Each position gets its own module shell holding the stored block's Parameter objects: the weights
    exist once (a repeated frozen block stays one tensor), while each shell's attention has its own
    layer_idx, so the KV cache of generation keeps one slot per executed position.
    """
    family = family_of(model)
    stored = get_path(model, family.blocks)
    seen: set[int] = set()
    shells = []
    for position, s in enumerate(share_map):
        block = stored[s]
        if s in seen:
            memo = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
            block = copy.deepcopy(block, memo)
        seen.add(s)
        _renumber_layer_idx(block, position)
        shells.append(block)
    for config in model_configs(model):
        set_depth(config, share_map)
    set_path(model, family.blocks, nn.ModuleList(shells))


@contextlib.contextmanager
def running_blocks(model: nn.Module, positions: list[int],
                   replace: dict[int, nn.Module] | None = None) -> Iterator[nn.Module]:
    """Run `model` with blocks[positions] (a block left out, or repeated) until the context ends.

    `replace` substitutes a module for block i (a compressed copy of a kept block, say). The block list
    and the configs' depth are swapped, then restored; the KV cache is off meanwhile because a repeated
    block's attention carries one layer_idx (caching would mix positions).
    """
    replace = replace or {}
    family = family_of(model)
    blocks = get_path(model, family.blocks)
    configs = model_configs(model)
    saved = [(c.num_hidden_layers, getattr(c, "layer_types", None), getattr(c, "use_cache", None)) for c in configs]
    set_path(model, family.blocks, nn.ModuleList(replace.get(i, blocks[i]) for i in positions))
    for config in configs:
        set_depth(config, positions)
        config.use_cache = False
    try:
        yield model
    finally:
        set_path(model, family.blocks, blocks)
        for config, (depth, layer_types, use_cache) in zip(configs, saved):
            config.num_hidden_layers, config.use_cache = depth, use_cache
            if layer_types is not None:
                config.layer_types = layer_types


def block_output(output) -> torch.Tensor:
    """A decoder block returns its hidden states alone (OPT, Llama) or first in a tuple (BLOOM, GPT-2)."""
    return output[0] if isinstance(output, tuple) else output


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder block was called with (a forward pre-hook's args/kwargs)."""
    return args[0] if args else kwargs["hidden_states"]


def with_block_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same block call with `hidden` in place of its hidden states (what a pre-hook returns to swap them)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
