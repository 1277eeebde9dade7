"""Narrower MLPs for the emulator's kept middle blocks: width as well as depth, at the same emulator size.

Layer drop removes whole blocks. An emulator of the same size can instead keep more blocks, each holding only the
MLP channels that matter most on the owner's public text (Minitron, Muralidharan et al. 2024, prunes width and
distils). A channel is one output of the MLP's input projection(s) (gate and up for a gated MLP), with its bias,
and the matching input of the output projection. Its score is its mean |activation| entering the output projection
on the calibration tokens times the norm of its output-projection column: what it moves, as often as it fires.

A narrowed block is an ordinary module of the model's class with smaller linear layers, so the fit trains it
and the stream runs it unchanged; `pad_mlp` puts it back to the model's width with zeros at the dropped channels
(the same function: a zero channel adds nothing) so a bundle stays a plain HF model directory.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from offsite_ds.block_stream import BlockSource, as_source, full_path, open_stream, sweep
from offsite_ds.errors import OffsiteError, UnsupportedModelError
from offsite_ds.families import Family, family_of, get_path, is_transposed_linear, set_path


def _linear(block: nn.Module, path: str, family: Family) -> nn.Module:
    module = get_path(block, path)
    if not (isinstance(module, nn.Linear) or is_transposed_linear(module)):
        raise UnsupportedModelError(f"family '{family.name}': no plain linear layer at '{path}' in its blocks, so its "
                                    "MLPs cannot be narrowed; build the emulator without --mlp-width")
    return module


def mlp_layers(block: nn.Module, family: Family) -> tuple[list[nn.Module], nn.Module]:
    """The block's MLP input projections (their outputs are the channels) and output projection."""
    if not family.mlp_channels:
        raise UnsupportedModelError(f"family '{family.name}' names no MLP channels in offsite_ds/families.py, so its "
                                    "MLPs cannot be narrowed; build the emulator without --mlp-width")
    ins = [_linear(block, p, family) for p in family.mlp_channels]
    out = _linear(block, family.mlp_out, family)
    widths = {_channels(m, True) for m in ins} | {_channels(out, False)}
    if len(widths) != 1:
        raise UnsupportedModelError(f"family '{family.name}': the MLP's projections disagree on its width "
                                    f"({sorted(widths)}), so it cannot be narrowed; build without --mlp-width")
    return ins, out


def _channel_dim(module: nn.Module, is_input: bool) -> int:
    """The weight dimension that indexes the MLP's channels: an input projection's outputs, the output projection's
    inputs (nn.Linear stores [out, in], GPT-2's Conv1D [in, out])."""
    return int(is_transposed_linear(module)) ^ int(not is_input)


def _channels(module: nn.Module, is_input: bool) -> int:
    return module.weight.shape[_channel_dim(module, is_input)]


def mlp_width(block: nn.Module, family: Family) -> int:
    """How many channels the block's MLP has."""
    return _channels(mlp_layers(block, family)[1], False)


def _resized(module: nn.Module, keep: torch.Tensor, width: int | None, is_input: bool) -> nn.Module:
    """`module` with only the channels `keep` (width None), or padded back to `width` with zeros elsewhere."""
    dim = _channel_dim(module, is_input)
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None
    if width is None:
        new_weight = weight.index_select(dim, keep.to(weight.device))
        new_bias = bias[keep] if bias is not None and is_input else bias
    else:
        shape = list(weight.shape)
        shape[dim] = width
        new_weight = weight.new_zeros(shape).index_copy(dim, keep.to(weight.device), weight)
        new_bias = bias.new_zeros(width).index_copy(0, keep.to(bias.device), bias) if bias is not None and is_input \
            else bias
    if isinstance(module, nn.Linear):
        resized = nn.Linear(new_weight.shape[1], new_weight.shape[0], bias=new_bias is not None, device="meta")
    else:
        from transformers.pytorch_utils import Conv1D

        resized = Conv1D(new_weight.shape[1], new_weight.shape[0])  # (nf, nx): its weight is [nx, nf]
    resized.weight = nn.Parameter(new_weight.clone(), requires_grad=module.weight.requires_grad)
    resized.bias = None if new_bias is None else nn.Parameter(new_bias.clone(), requires_grad=module.bias.requires_grad)
    return resized


def _resize_mlp(block: nn.Module, family: Family, keep: torch.Tensor, width: int | None) -> nn.Module:
    mlp_layers(block, family)  # refuses what cannot be narrowed, before anything changes
    for path in family.mlp_channels:
        set_path(block, path, _resized(get_path(block, path), keep, width, True))
    set_path(block, family.mlp_out, _resized(get_path(block, family.mlp_out), keep, width, False))
    return block


def narrow_mlp(block: nn.Module, family: Family, keep: torch.Tensor) -> nn.Module:
    """`block` (changed in place, and returned) with only the MLP channels `keep` (sorted indices)."""
    return _resize_mlp(block, family, keep, None)


def pad_mlp(block: nn.Module, family: Family, keep: torch.Tensor, width: int) -> nn.Module:
    """A narrowed `block` back at the model's `width`, zeros at the channels it dropped (the same function)."""
    if len(keep) != mlp_width(block, family):
        raise OffsiteError(f"block has {mlp_width(block, family)} MLP channels, but {len(keep)} are named to pad")
    return _resize_mlp(block, family, keep, width)


def live_channels(block: nn.Module, family: Family) -> torch.Tensor:
    """The MLP channels whose output-projection column is not all zeros (sorted indices): the others add
    nothing to the block's output, whatever their input, so a frozen block runs the same without them."""
    _, out = mlp_layers(block, family)
    weight = out.weight.detach()
    return torch.nonzero(weight.ne(0).any(dim=1 - _channel_dim(out, False))).flatten().cpu()


def drop_dead_channels(block: nn.Module, family: Family) -> int:
    """`block` (in place) without the MLP channels `live_channels` leaves out: a bundle stored zero-padded
    (`pad_mlp`) runs at its narrow cost again. Returns the width kept. Only for frozen blocks: a dropped
    channel could not learn during training."""
    keep = live_channels(block, family)
    if len(keep) == 0:
        keep = torch.tensor([0])  # an MLP that adds nothing: one zero channel keeps the module well formed
    if len(keep) < mlp_width(block, family):
        narrow_mlp(block, family, keep)
    return len(keep)


class _Delegating(BlockSource):
    """`source` itself, for a wrapper that changes one of its methods."""

    def __init__(self, source: BlockSource):
        self.source, self.model, self.depth = source, source.model, source.depth

    def block(self, index: int) -> nn.Module:
        return self.source.block(index)

    def release(self, index: int) -> None:
        self.source.release(index)

    def stand_in(self, index: int) -> nn.Module:
        return self.source.stand_in(index)


class _Scoring(_Delegating):
    """`source` whose blocks record, while they run, the |input| of their MLP's output projection per channel,
    and the norms of that projection's columns (read while the block is at hand: a streamed block is read once)."""

    def __init__(self, source: BlockSource, family: Family, blocks: set[int]):
        super().__init__(source)
        self.family, self.blocks = family, blocks
        self.sums: dict[int, torch.Tensor] = {}
        self.columns: dict[int, torch.Tensor] = {}
        self._hooks: list = []

    def block(self, index: int) -> nn.Module:
        module = self.source.block(index)
        if index in self.blocks:
            _, out = mlp_layers(module, self.family)
            self.columns[index] = out.weight.detach().float().norm(dim=1 - _channel_dim(out, False)).cpu()

            def add(_m, args, index=index):
                x = args[0].detach().float().abs()
                total = x.reshape(-1, x.shape[-1]).sum(0)
                self.sums[index] = self.sums.get(index, 0) + total
            self._hooks.append(out.register_forward_pre_hook(add))
        return module

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        try:
            yield
        finally:
            for h in self._hooks:
                h.remove()


@torch.no_grad()
def channel_scores(source: BlockSource, family: Family, ids: torch.Tensor, seq_len: int,
                   blocks: list[int]) -> dict[int, torch.Tensor]:
    """Per block in `blocks`, each MLP channel's score on the calibration tokens (higher = keep it): its mean
    |activation| entering the output projection times the norm of that projection's column. One pass of the
    full model (streamed where the source is), up to the last scored block."""
    scoring = _Scoring(source, family, set(blocks))
    with scoring.hooked():
        sweep(scoring, open_stream(source, ids, seq_len), [full_path(source)])
    return {i: (scoring.sums[i].cpu() / ids.numel()) * scoring.columns[i] for i in blocks}


def kept_channels(scores: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` best-scored channels, in their original order (ties: the lower index)."""
    if not 0 < width <= scores.numel():
        raise OffsiteError(f"an MLP width of {width} channels is outside 1..{scores.numel()}")
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))[:width]
    return torch.tensor(sorted(order), dtype=torch.long)


def narrowed_width(full: int, fraction: float) -> int:
    """Channels kept of `full` at `fraction`: rounded to a multiple of 8 where the MLP has 64 or more (what
    matrix kernels like), at least 1 and at most `full`."""
    width = round(full * fraction)
    if full >= 64:
        width = max(8, round(width / 8) * 8)
    return min(full, max(1, width))


class NarrowedCopies(_Delegating):
    """`source`, whose own copies of the blocks in `keep` come with only those MLP channels (what the fit
    trains); everything else, the teacher's blocks included, is the source's."""

    def __init__(self, source: BlockSource, family: Family, keep: dict[int, torch.Tensor], full: int,
                 fraction: float, tokens: int):
        super().__init__(source)
        self.family, self.keep, self.full, self.fraction, self.tokens = family, keep, full, fraction, tokens
        self.width = len(next(iter(keep.values())))

    @classmethod
    def scored(cls, source: nn.Module | BlockSource, blocks: list[int], ids: torch.Tensor, seq_len: int,
               fraction: float) -> NarrowedCopies:
        """Keep the best-scored `fraction` of each block's MLP channels on the calibration `ids`."""
        source = as_source(source)
        family = family_of(source.model)
        scores = channel_scores(source, family, ids, seq_len, blocks)
        widths = {scores[i].numel() for i in blocks}
        if len(widths) != 1:
            raise UnsupportedModelError(f"the kept blocks' MLPs differ in width ({sorted(widths)}); build the "
                                        "emulator without --mlp-width")
        full = widths.pop()
        width = narrowed_width(full, fraction)
        return cls(source, family, {i: kept_channels(scores[i], width) for i in blocks}, full, fraction,
                   int(ids.numel()))

    def own_copy(self, index: int) -> nn.Module:
        block = self.source.own_copy(index)
        return narrow_mlp(block, self.family, self.keep[index]) if index in self.keep else block

    def padded(self, index: int, block: nn.Module) -> nn.Module:
        """Narrowed block `index` at the model's width again, zeros at its dropped channels."""
        return pad_mlp(block, self.family, self.keep[index], self.full)

    def record(self) -> dict:
        """What the manifest keeps (compression.mlp_width)."""
        return {"fraction": self.fraction, "width": self.width, "full_width": self.full, "tokens": self.tokens}
