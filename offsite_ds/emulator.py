"""Build the emulator: the same HF class with fewer blocks, so plain `from_pretrained` loads it.

Uniform layer-drop of the middle is the paper's method; magnitude pruning and int8 fake-quantisation of
the kept middle blocks exist for the paper's compression ablation (Figure 4).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoTokenizer, PreTrainedModel

from offsite_ds.bundle import WrittenBundle, write_bundle
from offsite_ds.errors import OffsiteError
from offsite_ds.families import block_prefix, family_of, get_path
from offsite_ds.fitting import FitSettings
from offsite_ds.formats import WEIGHT_DTYPES
from offsite_ds.manifests import METHODS
from offsite_ds.shards import DEFAULT_SHARD_BYTES, ModelCheckpoint, ShardWriter
from offsite_ds.block_stream import (BlockSource, Stream, StreamedBlocks, Upcast, as_source, full_path, open_stream,
                                     path_nlls)
from offsite_ds.block_stream import Path as BlockPath
from offsite_ds.surgery import select_blocks, set_depth
from offsite_ds.sandwich import (SELECTIONS, Layout, block_map_for, emulator_block_map, middle_indices, select_crash,
                                 select_important, select_kept, share_map_for)

# Emulator/full zero-shot perplexity on the calibration text above which `emulate` warns, measured as
# the ratio on 1,024 tokens of the public Wikipedia sample, SmolLM2-135M at the demo's budget
# (benchmarks/results/2026-11-23-compare-2-8-2-cpu): adapters transferred (plug-in below zero-shot) at 67.6x
# (importance 2-8-2), 73x (uniform 2-9-2), 161.6x (crash 2-8-2); not at 1,094x (uniform 2-8-2), 32,004x
# (crash --share 2-8-2). Provisional: five points, one model.
GUARD_RATIO = 400.0
DEFAULT_SELECT = "importance"  # SmolLM2 2-8-2 test plug-in: uniform 85.66 (zero-shot 64.85), importance 55.29
PUBLIC_SAMPLE = "builtin:public-sample"  # the default calibration text, shipped in the package (public_text/)
PUBLIC_CORPUS = "builtin:wikipedia"  # the full public Wikipedia sample (an optional install: gensim's wheel)
BUILTIN_TEXTS = (PUBLIC_SAMPLE, PUBLIC_CORPUS)
# `make_bundle(fit=AUTO_FIT)`, the default: the kept blocks are fitted (FitSettings' defaults) wherever the builder
# allows it. SmolLM2-135M importance 2-8-2, the demo's round trip: emulator / full model on PTB valid 32x -> 12.1x,
# plug-in 48.15 / 56.01 -> 42.97 / 47.23 (valid / test), the owner's step 50-77 s -> 361 s on the idle 2-core CPU
AUTO_FIT = "auto"


def public_calibration(calib_data: str | Path | None) -> str | Path | None:
    """A `builtin:` name -> the file of that public text's train split; anything else unchanged.

    `builtin:public-sample` ships inside the package; `builtin:wikipedia` needs the gensim wheel, and only
    asking for it gives the one-line install advice.
    """
    if calib_data is None or str(calib_data) not in BUILTIN_TEXTS:
        return calib_data
    from offsite_ds.demo_assets import public_sample_file, wikipedia_file

    if str(calib_data) == PUBLIC_SAMPLE:
        return public_sample_file("train")
    try:
        return wikipedia_file("train")
    except OffsiteError as exc:
        raise OffsiteError(f"{exc}; or keep the default --calib-data {PUBLIC_SAMPLE} (shipped with offsite-ds), "
                           "or pass --calib-data FILE (your public text)") from None


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


def resolved_fit(fit: FitSettings | str | None, calib_data, method: str, share: bool) -> FitSettings | None:
    """The fit that runs: `AUTO_FIT` is FitSettings() where a fit can run (calibration text, plain layer-drop, no
    --share) and none elsewhere; FitSettings given where it cannot run is refused in one line."""
    fits = calib_data is not None and method == "drop" and not share
    if fit == AUTO_FIT:
        return FitSettings() if fits else None
    if fit is not None and not fits:
        raise OffsiteError("--fit trains the kept blocks on the owner's public text: it needs calibration text "
                           "(not --no-calib), plain layer-drop (--method drop) and no --share")
    return fit


def check_builder(select: str, share: bool, has_calibration: bool) -> None:
    """Refuse a builder choice that cannot run, before anything is loaded."""
    if select not in SELECTIONS:
        raise OffsiteError(f"unknown --select '{select}'; choose one of {', '.join(SELECTIONS)}")
    if share and select != "crash":
        raise OffsiteError("--share repeats each CRaSh cluster's kept block; use it with --select crash")
    if select != "uniform" and not has_calibration:
        raise OffsiteError(f"--select {select} scores blocks on the owner's public text: pass --calib-data FILE "
                           f"(never the data owner's corpus) or keep the default {PUBLIC_SAMPLE}, not --no-calib")


def check_mlp_width(mlp_width: float | None, calib_data, method: str, share: bool) -> None:
    """Narrow MLPs need calibration text (the channels are scored on it) and plain layer-drop without sharing."""
    if mlp_width is None:
        return
    if not 0 < mlp_width <= 1:
        raise OffsiteError(f"--mlp-width {mlp_width:g} is the fraction of MLP channels each kept middle block keeps: "
                           "give 0 < F <= 1 (0.54 at 2-12-2 holds about as many weights as 2-8-2)")
    if calib_data is None or method != "drop" or share:
        raise OffsiteError("--mlp-width scores MLP channels on the owner's public text: it needs calibration text "
                           "(not --no-calib), plain layer-drop (--method drop) and no --share")


def check_max_ratio(max_ratio: float | None) -> None:
    """A fidelity target is an emulator/full perplexity ratio: positive (refused before the model is loaded)."""
    if max_ratio is not None and not max_ratio > 0:
        raise OffsiteError(f"--max-ratio {max_ratio:g} must be positive (emulator/full perplexity, e.g. 3)")


def choose_blocks(model: PreTrainedModel | BlockSource, layout: Layout, select: str = "uniform", share: bool = False,
                  calib_ids: torch.Tensor | None = None, seq_len: int | None = None, importance: str = "drop",
                  sample_tokens: int | None = None, progress: bool = False,
                  max_ratio: float | None = None, checkpoints=None) -> tuple[Layout, list[int], list[int] | None, dict]:
    """Which middle blocks the emulator keeps: (layout, block_map, share_map or None, facts for the manifest).

    `uniform` is the paper's rule; `importance` keeps the K middle blocks whose removal hurts most on the
    calibration text; `crash` merges adjacent blocks into K runs by CKA and keeps one per run
    (sandwich.cluster_representatives), and with `share` each dropped position runs its run's kept block;
    `iterative` removes blocks one at a time, re-scoring the rest after each removal (offsite_ds.elimination).
    With `max_ratio` (the layout's K is then an upper bound) K is the fewest kept blocks whose emulator/full
    perplexity ratio on the calibration text stays within it, and the returned layout carries that K.
    Only the owner's calibration ids are read. `model` may be a BlockSource (the checkpoint streamed).
    `checkpoints` (offsite_ds.fitting.FitCheckpoints) keeps the elimination path after each removal.
    """
    from offsite_ds import calibrate

    check_builder(select, share, calib_ids is not None)
    check_max_ratio(max_ratio)
    model = as_source(model)
    n_layers = model.depth
    middle = middle_indices(n_layers, layout)
    seq_len = seq_len or calibrate.calibration_seq_len(model)
    sample = sample_tokens or calibrate.DEFAULT_SAMPLE_TOKENS
    if select == "iterative":
        from offsite_ds.elimination import elimination_path, kept_after

        _, steps = elimination_path(model, calib_ids, middle, seq_len,
                                    min_kept=2 if max_ratio is not None else max(2, layout.kept),
                                    max_ratio=max_ratio, progress=progress, checkpoints=checkpoints)
        if max_ratio is not None:
            fewest = len(middle) - len(steps)
            if fewest > layout.kept or (not steps and max_ratio < 1.0):
                raise OffsiteError(f"the fewest kept blocks within --max-ratio {max_ratio:g} are K={fewest}, more than "
                                   f"the layout allows (K <= {layout.kept}); raise --max-ratio or write L-*-R")
            layout = layout.with_kept(fewest)
        kept = kept_after(middle, steps, layout.kept)
        elimination = [{"removed": st.removed, "ratio": st.ratio} for st in steps]
        return layout, block_map_for(n_layers, layout, kept), None, {"elimination": elimination}

    def rule(k: int) -> tuple[list[int], list[list[int]] | None]:
        if select == "uniform":
            return select_kept(middle, k), None
        if select == "importance":
            return select_important(middle, k, scores), None
        return select_crash(middle, k, similarity)

    facts: dict = {}
    if select == "importance":
        scores = calibrate.importance_scores(model, calib_ids, middle, seq_len, importance, sample, progress)
        facts["scores"] = scores
    if select == "crash":
        similarity = calibrate.middle_similarity(model, calib_ids, middle, seq_len, sample)
        facts["scores"] = [similarity[i][i + 1] for i in range(len(middle) - 1)]
    if max_ratio is not None:
        stream = open_stream(model, calib_ids, seq_len)
        full_nll = path_nlls(model, stream, [full_path(model)])[0]  # once: every probed K is measured against it
        layout = fewest_within(layout, max_ratio, lambda k: _ratio(model, stream, layout, k, rule, share, full_nll))
    kept, clusters = rule(layout.kept)
    share_map = share_map_for(n_layers, layout, clusters) if share and clusters is not None else None
    return layout, block_map_for(n_layers, layout, kept), share_map, facts


def _ratio(source: BlockSource, stream: Stream, layout: Layout, k: int, rule, share: bool, full_nll: float) -> float:
    """Emulator/full perplexity ratio on the calibration stream of the emulator `rule` builds with K=k."""
    trial = layout.with_kept(k)
    kept, clusters = rule(k)
    block_map = block_map_for(source.depth, trial, kept)
    if share and clusters is not None:
        block_map = [block_map[s] for s in share_map_for(source.depth, trial, clusters)]
    return math.exp(path_nlls(source, stream, [BlockPath(tuple(block_map))])[0] - full_nll)


def fewest_within(layout: Layout, max_ratio: float, ratio_at) -> Layout:
    """The layout with the fewest kept middle blocks (at most layout.kept) whose `ratio_at(K)` <= max_ratio.

    Bisection, about log2(K) measurements: it assumes the ratio falls as K grows (true of the rules here in
    practice, not by construction); whatever happens, a K that misses the target is never returned, because
    only measured passing K are. Refuses when even K = layout.kept misses.
    """
    low, high = 1, layout.kept
    top = ratio_at(high)
    if top > max_ratio:
        raise OffsiteError(f"even K={high} gives an emulator {top:.2f}x the full model on the "
                           f"calibration text, above --max-ratio {max_ratio:g}; raise it or give fewer adapter blocks")
    while low < high:
        mid = (low + high) // 2
        if ratio_at(mid) <= max_ratio:
            high = mid
        else:
            low = mid + 1
    return layout.with_kept(high)


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


@torch.no_grad()
def compress_(module: nn.Module, method: str, prune_ratio: float = 0.5, quant_bits: int = 8) -> None:
    """Apply the ablation's compression to a module's parameters in place (nothing for plain layer-drop)."""
    transform = compression_transform(method, prune_ratio, quant_bits)
    if transform is not None:
        for param in module.parameters():
            param.copy_(transform(param))


def build_emulator(model: PreTrainedModel, layout: Layout, method: str = "drop", prune_ratio: float = 0.5,
                   quant_bits: int = 8, block_map: list[int] | None = None) -> tuple[PreTrainedModel, list[int]]:
    """Emulator of `model` for `layout` (uniform unless `block_map` is given); returns it with its block map."""
    compression_transform(method, prune_ratio, quant_bits)  # checks the settings before any copy
    family = family_of(model)
    n_layers = len(get_path(model, family.blocks))
    block_map = block_map or emulator_block_map(n_layers, layout)
    emulator = select_blocks(model, block_map)
    compress_(get_path(emulator, family.blocks)[layout.bottom: layout.bottom + layout.kept], method, prune_ratio,
              quant_bits)
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
    for original in checkpoint.held():
        where = checkpoint.block_of(original)
        if where is None:
            jobs.append((original, original, None))
        elif where[0] in position_of:
            position = position_of[where[0]]
            jobs.append((original, f"{block_prefix(checkpoint.family, position)}{where[1]}", position))

    def out_dtype(original: str) -> torch.dtype:
        stored = checkpoint.stored_dtype(original)
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
                dtype: torch.dtype | str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                select: str = DEFAULT_SELECT, share: bool = False, calib_data: str | Path | None = PUBLIC_SAMPLE,
                calib_tokens: int | None = None, importance: str = "drop", text_field: str = "text",
                guard_ratio: float | None = None, progress: bool = False, log=None, max_ratio: float | None = None,
                allow_far: bool = False, fit: FitSettings | str | None = AUTO_FIT,
                checkpoint_dir: str | Path | None = None,
                save_every_s: float = 600.0, mlp_width: float | None = None) -> WrittenBundle:
    """Model owner's `emulate`: full model dir -> EmulatorBundle dir, its weights streamed from the checkpoint.

    The bundle keeps the checkpoint's dtype (a bf16 model gives a bf16 bundle) unless `dtype` is given.
    The default keeps the middle blocks whose removal hurts most on public text (`PUBLIC_SAMPLE`, the Wikipedia
    sample, unless `calib_data` names the owner's own public file): uniform drop, the paper's rule, broke the
    modern model measured here. Uniform layer-drop with `calib_data=None` never loads the model. With `calib_data`
    (the owner's PUBLIC corpus) the model is loaded once to score blocks for the builders that need it and for the
    guard, which measures the emulator's and the full model's zero-shot perplexity on it, records both as
    `quality`. An emulator whose ratio exceeds `guard_ratio` is not written (one-line OffsiteError saying what
    to do) unless `allow_far`, which writes it with a warning through `log` (default: stderr). `max_ratio` is
    the owner's fidelity knob: K becomes the fewest kept blocks (at most the layout's; 'L-*-R' means the
    whole middle) whose ratio stays within it, recorded in the manifest. `fit` trains each kept middle block to
    stand in for the run it replaces (offsite_ds.fitting) on the public text that follows the calibration
    tokens, so the guard still measures on tokens the fit never saw; by default (`AUTO_FIT`) wherever it can run,
    `None` never. The weights are written tensor by tensor from the checkpoint (a fitted block's from its trained
    copy). Returns the bundle's directory and its validated manifest.

    With calibration text the long steps (sampling, selection, each fitted block, the training steps every
    `save_every_s` seconds and on SIGTERM) are kept in `checkpoint_dir` (default OUT.checkpoints), removed once the
    bundle is written: the same call after a stop (crash, Ctrl-C, SIGTERM, or the guard's refusal: `guard_ratio` and
    `allow_far` are not part of the run) goes on from there to the very bundle an uninterrupted run writes.

    `mlp_width` F: each kept middle block keeps only the fraction F of its MLP channels that score highest on the
    calibration text (offsite_ds.narrow), so more blocks fit in the same size (2-12-2 at 0.54 holds about 2-8-2's
    weights); they are fitted narrow and written zero-padded at the dropped channels (a plain HF directory, which
    `load_bundle` runs narrow again). F = 1 keeps whole blocks, as None does.
    """
    from offsite_ds.engines import checkpoint_dir_beside
    from offsite_ds.fingerprints import fingerprint_checkpoint
    from offsite_ds.fitting import FitCheckpoints

    log = log or (lambda line: print(line, file=sys.stderr))
    checkpoints = FitCheckpoints(checkpoint_dir or checkpoint_dir_beside(out_dir), save_every_s)
    transform = compression_transform(method, prune_ratio, quant_bits)
    dtype = parse_dtype(dtype)
    check_builder(select, share, calib_data is not None)
    check_mlp_width(mlp_width, calib_data, method, share)
    mlp_width = None if mlp_width == 1 else mlp_width  # every channel kept: whole blocks, nothing to score
    checkpoint = ModelCheckpoint(model_dir)
    n_layers = checkpoint.depth
    layout = Layout.parse(layout_spec, n_layers, keep_ratio, upper_bound=max_ratio is not None)
    check_max_ratio(max_ratio)
    if max_ratio is not None and calib_data is None:
        raise OffsiteError("--max-ratio measures the emulator on the owner's public text: drop --no-calib")
    fit_auto, fit = fit == AUTO_FIT, resolved_fit(fit, calib_data, method, share)
    if fit is not None and fit.kl_perturb and not layout.bottom:
        raise OffsiteError(f"--fit-kl-perturb perturbs the bottom adapter; layout {layout} has none: give L >= 1")
    block_map, share_map, facts, quality = emulator_block_map(n_layers, layout), None, {}, None
    calibration, fitted = None, {}
    base_fingerprint = fingerprint_checkpoint(checkpoint)
    if calib_data is not None:
        # what makes the result: a stopped run resumes only into the same one
        run_key = {"model": base_fingerprint, "layout": layout_spec, "keep_ratio": keep_ratio, "method": method,
                   "prune_ratio": prune_ratio, "bits": quant_bits, "select": select, "share": share,
                   "calib_tokens": calib_tokens, "importance": importance, "text_field": text_field,
                   "max_ratio": max_ratio, "fit": None if fit is None else asdict(fit), "fit_auto": fit_auto,
                   "dtype": str(dtype), "mlp_width": mlp_width}
        layout, block_map, share_map, facts, calibration, quality, fitted = _calibrated_choice(
            model_dir, layout, method, prune_ratio, quant_bits, select, share, public_calibration(calib_data),
            calib_tokens, importance, text_field, progress, max_ratio, fit, log, dtype or checkpoint.dtype(), fit_auto,
            checkpoints, run_key, mlp_width)
        warning = guard_warning(quality, guard_ratio, layout, select)
        if warning and not allow_far:
            kept = f"; its fit is kept in {checkpoints.root} for that" if checkpoints.held() else ""
            raise OffsiteError(f"{warning}; nothing written (--allow-far writes it anyway){kept}")
        if warning:
            log(f"warning: {warning}")
    compression = {"method": method, "kept": layout.kept, "middle": n_layers - layout.bottom - layout.top,
                   "distilled": False, "select": select, "shared": share_map is not None}
    if method == "prune":
        compression["prune_ratio"] = prune_ratio
    if method == "quantize":
        compression["bits"] = quant_bits
    if calibration is not None:
        compression["calibration"] = calibration
    if max_ratio is not None:
        compression["max_ratio"] = max_ratio
    compression.update(facts)
    dtype = dtype or checkpoint.dtype()
    middle = range(layout.bottom, layout.bottom + layout.kept)

    fitted_at = {block_map.index(i): block.state_dict() for i, block in fitted.items()}

    def per_tensor(position: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if position in fitted_at:
            return fitted_at[position][name]
        return transform(tensor) if transform is not None and position in middle else tensor

    def write(tmp: Path) -> None:
        write_emulator(checkpoint, block_map, tmp, dtype, per_tensor if transform or fitted_at else None,
                       max_shard_bytes)

    manifest = {
        "family": checkpoint.family.name,
        "model_type": checkpoint.config.model_type,
        "base_depth": n_layers,
        "base_fingerprint": base_fingerprint,
        "layout": str(layout),
        "block_map": block_map,
        "adapter_positions": layout.adapter_positions,
        "compression": compression,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if share_map is not None:
        manifest["share_map"] = share_map
    if quality is not None:
        manifest["quality"] = quality
    written = write_bundle(write, manifest, out_dir)
    checkpoints.remove()
    return written


def _auto_fit_on_short_text(fit: FitSettings, available: int, calib_data, n_calib: int, log) -> FitSettings | None:
    """The default fit on public text that holds fewer tokens than it reads: all of them, if they make one batch."""
    least = fit.batch_size * fit.seq_len
    if available >= least:
        log(f"fit: {calib_data} holds {available} tokens after the {n_calib} calibration tokens; fitting on those "
            f"(the default reads {fit.tokens}: more public text gives a closer emulator)")
        return replace(fit, tokens=available)
    log(f"not fitted: {calib_data} holds {available} tokens after the {n_calib} calibration tokens and the fit needs "
        f"at least {least}; give more public text for a closer emulator (--no-fit silences this)")
    return None


def _calibrated_choice(model_dir, layout: Layout, method: str, prune_ratio: float, quant_bits: int, select: str,
                       share: bool, calib_data, calib_tokens: int | None, importance: str, text_field: str,
                       progress: bool, max_ratio: float | None = None, fit: FitSettings | None = None, log=None,
                       bundle_dtype: torch.dtype | None = None, fit_auto: bool = False, checkpoints=None,
                       run_key: dict | None = None, mlp_width: float | None = None
                       ) -> tuple[Layout, list[int], list[int] | None, dict, dict, dict, dict[int, nn.Module]]:
    """Stream the model (fp32, block by block from its shards) to choose the blocks on the owner's calibration
    text, fit them when asked, and measure the guard: (layout, block_map, share_map, facts, calibration,
    quality, fitted blocks). `fit_auto` (the default fit, not one asked for): public text shorter than the fit's
    tokens fits on what there is, down to one batch, and below that leaves the blocks unfitted; either way one line
    through `log` says so, and the manifest records what ran.

    Memory is the embeddings and head, one block, the cached hidden states and the kept copies (compressed or
    fitted), never the whole model. The guard's emulator is the full model run with the chosen blocks, so no
    emulator is built here. `checkpoints` (offsite_ds.fitting.FitCheckpoints) is opened with `run_key` and the
    corpus' fingerprint once the text is read: the sampled text, the choice and the fit are kept there.
    """
    from offsite_ds import calibrate

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    n_calib = calib_tokens or calibrate.DEFAULT_CALIB_TOKENS
    calib_ids, calibration = calibrate.calibration_ids(calib_data, tokenizer,  # a bad corpus fails before the load
                                                       n_calib + (fit.public_tokens if fit else 0), text_field)
    calib_ids, fit_ids = calib_ids[:n_calib], calib_ids[n_calib:]
    calibration["tokens"] = int(calib_ids.numel())
    if checkpoints is not None:
        checkpoints.open({**(run_key or {}), "corpus": calibration["corpus_fingerprint"]}, log)
    sampled = None
    if fit is not None and fit.text == "self":  # the model whole for a while, freed before the stream opens
        from offsite_ds.fitting import sample_own_text

        kept = checkpoints.load("sampled") if checkpoints is not None else None
        if kept is not None:
            fit_ids, sampled = kept["ids"], kept["record"]
        else:
            fit_ids, sampled = sample_own_text(model_dir, tokenizer, fit, progress)
            if checkpoints is not None:
                checkpoints.save("sampled", {"ids": fit_ids, "record": sampled})
        if log is not None:
            log(f"sampled {sampled['tokens']} tokens of the model's own text for the fit in {sampled['seconds']} s"
                + (" (before the run was resumed)" if kept is not None else ""))
    if fit is not None and fit_auto and fit_ids.numel() < fit.public_tokens:
        fit = _auto_fit_on_short_text(fit, int(fit_ids.numel()), calib_data, n_calib, log)
    if fit is not None and fit_ids.numel() < fit.public_tokens:
        flag = "--fit-tokens" if fit.public_tokens == fit.tokens else "--fit-kl-tokens"
        raise OffsiteError(f"{flag} {fit.public_tokens}: {calib_data} holds {fit_ids.numel()} tokens after the "
                           f"{n_calib} calibration tokens; give more public text (--calib-data builtin:wikipedia, "
                           f"or your own), fewer {flag}, or --no-fit")
    # an owner-scale model scores in seconds on a GPU, in hours on a CPU
    model = StreamedBlocks(model_dir, device="cuda" if torch.cuda.is_available() else None)
    chosen = checkpoints.load("choice") if checkpoints is not None else None
    if chosen is not None:  # json-shaped: what choose_blocks returned before the run stopped
        layout, (block_map, share_map, facts) = Layout.parse(chosen["layout"], model.depth), json.loads(chosen["rest"])
    else:
        layout, block_map, share_map, facts = choose_blocks(model, layout, select, share, calib_ids,
                                                            importance=importance, progress=progress,
                                                            max_ratio=max_ratio, checkpoints=checkpoints)
        if checkpoints is not None:
            checkpoints.save("choice", {"layout": str(layout), "rest": json.dumps([block_map, share_map, facts])})
    executed = [block_map[s] for s in share_map] if share_map is not None else block_map
    compressed, fitted = {}, {}
    kept_middle = block_map[layout.bottom:layout.bottom + layout.kept]
    for i in (kept_middle if method != "drop" else []):
        compressed[i] = model.own_copy(i)
        compress_(compressed[i], method, prune_ratio, quant_bits)
    source, narrowing = model, None
    if mlp_width is not None:  # the kept blocks' own copies come narrowed: the fit trains them so
        from offsite_ds.narrow import NarrowedCopies

        source = narrowing = NarrowedCopies.scored(model, kept_middle, calib_ids, calibrate.calibration_seq_len(model),
                                                   mlp_width)
        facts = {**facts, "mlp_width": narrowing.record()}
        if log is not None:
            log(f"narrow MLPs: the {layout.kept} kept middle blocks keep {narrowing.width} of {narrowing.full} "
                f"channels each, scored on {calib_ids.numel()} calibration tokens")
    if fit is not None:
        from offsite_ds.fitting import fit_kept_blocks

        fitted, report, kl = fit_kept_blocks(source, fit_ids, block_map, layout.bottom, layout.kept, fit, progress,
                                             log, store_dtype=bundle_dtype, checkpoints=checkpoints, held_out=calib_ids)
        facts = {**facts, "fit": {**asdict(fit), "blocks": report, **({"kl": kl} if kl else {}),
                                  **({"sampled": sampled} if sampled else {})}}
    if narrowing is not None:  # written at the model's width, zeros at the dropped channels: the same function
        fitted = {i: narrowing.padded(i, fitted[i] if i in fitted else narrowing.own_copy(i).to(bundle_dtype))
                  for i in kept_middle}
    quality = calibrate.quality(model, executed, calib_ids, calibrate.calibration_seq_len(model),
                                calibration["corpus_fingerprint"],
                                replace=compressed or {i: Upcast(b, model.dtype) for i, b in fitted.items()})
    return layout, block_map, share_map, facts, calibration, quality, fitted


def guard_warning(quality: dict, threshold: float | None, layout: Layout, select: str) -> str | None:
    """One line telling the owner its emulator is too far from the model for an adapter to transfer."""
    threshold = GUARD_RATIO if threshold is None else threshold
    if quality["ratio"] <= threshold:
        return None
    return (f"the {layout} {select} emulator's perplexity on the calibration text is "
            f"{quality['ratio']:.1f}x the full model's ({quality['emulator_ppl']:.1f} vs {quality['full_ppl']:.1f}; "
            f"guard {threshold:g}x): an adapter tuned through it may not transfer - let K follow a fidelity target "
            f"(--layout {layout.bottom}-*-{layout.top} --max-ratio {threshold:g}), use "
            "--select iterative, or distil it (offsite-ds distill)")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """'bfloat16' / torch.bfloat16 / None (keep the checkpoint's) -> torch dtype, checked."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in WEIGHT_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in WEIGHT_DTYPES:
        return WEIGHT_DTYPES[dtype]
    raise OffsiteError(f"--dtype {dtype} is not one of {', '.join(WEIGHT_DTYPES)}")
