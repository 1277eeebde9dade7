"""Build the emulator: the same HF class with fewer blocks, so plain `from_pretrained` loads it.

Uniform layer-drop of the middle is the paper's method; magnitude pruning and int8 fake-quantisation of
the kept middle blocks exist for the paper's compression ablation (Figure 4).
"""
from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoTokenizer, PreTrainedModel

from offsite_ds.errors import OffsiteError
from offsite_ds.families import family_of, get_path, set_path
from offsite_ds.sandwich import (SELECTIONS, Layout, block_map_for, emulator_adapter_positions, emulator_block_map,
                                 middle_indices, parse_layout, select_crash, select_important, select_kept,
                                 share_map_for)

METHODS = ("drop", "prune", "quantize")
# Emulator/full zero-shot perplexity on the calibration text above which `emulate` warns. Measured on
# SmolLM2-135M, 1,024 tokens of the public Wikipedia sample (benchmarks/results/e1-builders-smollm2):
# uniform 2-9-2 is 73x and its adapter transfers (demo: plug-in 56.64 < 64.86 zero-shot on PTB test),
# uniform 2-8-2 is 1,094x and its adapter does not (plug-in 85.51). Provisional: two points, one model.
GUARD_RATIO = 100.0


def _renumber_layer_idx(block: nn.Module, position: int) -> None:
    """Attention modules carry their block index for the KV cache; it must follow the new position."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = position


def set_depth(config, block_map: list[int]) -> None:
    """Set a config to the chosen blocks (indices of its current ones), per-layer lists such as `layer_types` too."""
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
    from offsite_ds.calibrate import model_configs

    for config in model_configs(model):
        set_depth(config, share_map)
    set_path(model, family.blocks, nn.ModuleList(shells))


def choose_blocks(model: PreTrainedModel, layout: Layout, select: str = "uniform", share: bool = False,
                  calib_ids: torch.Tensor | None = None, seq_len: int | None = None, importance: str = "drop",
                  sample_tokens: int | None = None, progress: bool = False) -> tuple[list[int], list[int] | None, dict]:
    """Which middle blocks the emulator keeps: (block_map, share_map or None, facts for the manifest).

    `uniform` is the paper's rule; `importance` keeps the K middle blocks whose removal hurts most on the
    calibration text; `crash` merges adjacent blocks into K runs by CKA and keeps one per run
    (sandwich.cluster_representatives), and with `share` each dropped position runs its run's kept block.
    Only the owner's calibration ids are read.
    """
    from offsite_ds import calibrate

    if select not in SELECTIONS:
        raise OffsiteError(f"unknown --select '{select}'; choose one of {', '.join(SELECTIONS)}")
    if share and select != "crash":
        raise OffsiteError("--share repeats each CRaSh cluster's kept block; use it with --select crash")
    n_layers = len(get_path(model, family_of(model).blocks))
    middle = middle_indices(n_layers, layout)
    if select == "uniform":
        return block_map_for(n_layers, layout, select_kept(middle, layout.kept)), None, {}
    if calib_ids is None:
        raise OffsiteError(f"--select {select} scores blocks on the owner's public text: pass --calib-data FILE "
                           "(never the data owner's corpus)")
    seq_len = seq_len or calibrate.calibration_seq_len(model)
    sample = sample_tokens or calibrate.DEFAULT_SAMPLE_TOKENS
    if select == "importance":
        scores = calibrate.importance_scores(model, calib_ids, middle, seq_len, importance, sample, progress)
        kept = select_important(middle, layout.kept, scores)
        return block_map_for(n_layers, layout, kept), None, {"scores": scores}
    similarity = calibrate.middle_similarity(model, calib_ids, middle, seq_len, sample)
    kept, clusters = select_crash(middle, layout.kept, similarity)
    facts = {"scores": [similarity[i][i + 1] for i in range(len(middle) - 1)]}
    share_map = share_map_for(n_layers, layout, clusters) if share else None
    return block_map_for(n_layers, layout, kept), share_map, facts


def compress_(module: nn.Module, method: str, prune_ratio: float = 0.5, quant_bits: int = 8) -> None:
    """Apply the ablation's compression of the kept middle (nothing for plain layer-drop)."""
    if method == "prune":
        magnitude_prune_(module, prune_ratio)
    elif method == "quantize":
        fake_quantize_(module, quant_bits)


def build_emulator(model: PreTrainedModel, layout: Layout, method: str = "drop", prune_ratio: float = 0.5,
                   quant_bits: int = 8, block_map: list[int] | None = None) -> tuple[PreTrainedModel, list[int]]:
    """Emulator of `model` for `layout` (uniform unless `block_map` is given); returns it with its block map."""
    if method not in METHODS:
        raise OffsiteError(f"unknown compression method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "prune" and not 0.0 < prune_ratio < 1.0:
        raise OffsiteError(f"--prune-ratio {prune_ratio} must be in (0, 1)")
    if method == "quantize" and not 2 <= quant_bits <= 16:
        raise OffsiteError(f"--bits {quant_bits} must be between 2 and 16")
    family = family_of(model)
    n_layers = len(get_path(model, family.blocks))
    block_map = block_map or emulator_block_map(n_layers, layout)
    emulator = select_blocks(model, block_map)
    compress_(get_path(emulator, family.blocks)[layout.bottom: layout.bottom + layout.kept], method, prune_ratio,
              quant_bits)
    return emulator, block_map


def make_bundle(model_dir: str | Path, layout_spec: str, out_dir: str | Path, keep_ratio: float | None = None,
                method: str = "drop", prune_ratio: float = 0.5, quant_bits: int = 8, select: str = "uniform",
                share: bool = False, calib_data: str | Path | None = None, calib_tokens: int | None = None,
                importance: str = "drop", text_field: str = "text", guard_ratio: float | None = None,
                progress: bool = False, log=None) -> Path:
    """Model owner's `emulate`: full model dir -> EmulatorBundle dir.

    With `calib_data` (the owner's PUBLIC corpus) the builders that need it score blocks on it, and the
    guard measures the emulator's and the full model's zero-shot perplexity on it, records both as
    `quality`, and warns through `log` (default: stderr) when their ratio exceeds `guard_ratio`.
    """
    from offsite_ds import calibrate
    from offsite_ds.bundle import fingerprint_model, save_bundle
    from offsite_ds.runtime import load_model

    log = log or (lambda line: print(line, file=sys.stderr))
    model = load_model(model_dir)
    family = family_of(model)
    n_layers = len(get_path(model, family.blocks))
    layout = parse_layout(layout_spec, n_layers, keep_ratio)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    calib_ids, calibration = None, None
    if calib_data is not None:
        calib_ids, calibration = calibrate.calibration_ids(calib_data, tokenizer,
                                                           calib_tokens or calibrate.DEFAULT_CALIB_TOKENS, text_field)
    block_map, share_map, facts = choose_blocks(model, layout, select, share, calib_ids, importance=importance,
                                                progress=progress)
    compression = {"method": method, "kept": layout.kept, "middle": n_layers - layout.bottom - layout.top,
                   "distilled": False, "select": select, "shared": share_map is not None}
    if method == "prune":
        compression["prune_ratio"] = prune_ratio
    if method == "quantize":
        compression["bits"] = quant_bits
    if calibration is not None:
        compression["calibration"] = calibration
    compression.update(facts)
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
    if share_map is not None:
        manifest["share_map"] = share_map
    if calib_ids is not None:  # the guard: the emulator is the full model run with its blocks (no copy)
        executed = [block_map[s] for s in share_map] if share_map is not None else block_map
        blocks = get_path(model, family.blocks)
        compressed = {}
        for i in (block_map[layout.bottom:layout.bottom + layout.kept] if method != "drop" else []):
            compressed[i] = copy.deepcopy(blocks[i])
            compress_(compressed[i], method, prune_ratio, quant_bits)
        manifest["quality"] = calibrate.quality(model, executed, calib_ids, calibrate.calibration_seq_len(model),
                                                calibration["corpus_fingerprint"], replace=compressed)
        warning = guard_warning(manifest["quality"], guard_ratio, str(layout), select)
        if warning:
            log(warning)
    emulator, _ = build_emulator(model, layout, method, prune_ratio, quant_bits, block_map)
    return save_bundle(emulator, tokenizer, manifest, out_dir)


def guard_warning(quality: dict, threshold: float | None, layout: str, select: str) -> str | None:
    """One line telling the owner its emulator is too far from the model for an adapter to transfer."""
    threshold = GUARD_RATIO if threshold is None else threshold
    if quality["ratio"] <= threshold:
        return None
    return (f"warning: the {layout} {select} emulator's perplexity on the calibration text is "
            f"{quality['ratio']:.1f}x the full model's ({quality['emulator_ppl']:.1f} vs {quality['full_ppl']:.1f}; "
            f"guard {threshold:g}x): an adapter tuned through it may not transfer - use a larger K, another "
            "--select (importance, crash --share), or distil it (offsite-ds distill)")
