"""Iterative block elimination on the owner's public text (SLEB, Song et al., ICML 2024).

One-shot importance scores each middle block dropped alone; at the paper's compression (18 of 26 blocks
removed on SmolLM2) what matters is how removals interact. Elimination removes one block at a time, the one
whose removal raises the calibration perplexity least, and re-scores every remaining block after each
removal. The path it walks (which block went at each step, and the emulator/full perplexity ratio after it)
is also the owner's fidelity knob: the fewest kept blocks whose ratio stays under a target
(`emulate --layout 2-*-2 --max-ratio 3`) is read off the same path.

Cost: re-scoring is a forward pass per remaining candidate per step. Each step first runs the current
emulator once, keeping every block's input; a candidate is then scored from its own cached input through the
blocks after it only, which halves the work on average. The middle's first and last block are never
removed (they meet the adapter blocks), as in the other rules.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from offsite_ds.calibrate import mean_nll
from offsite_ds.surgery import block_input, running_blocks, with_block_input
from offsite_ds.errors import LayoutError
from offsite_ds.families import family_of, get_path


@dataclass(frozen=True)
class Step:
    """One removal: the original block removed and the calibration NLL gap to the full model after it."""
    removed: int
    nll_gap: float

    @property
    def ratio(self) -> float:
        return math.exp(self.nll_gap)


@contextlib.contextmanager
def _record_inputs(blocks: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Each block's hidden-state input, one tensor per forward call (batch), in call order."""
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [b.register_forward_pre_hook(lambda _m, a, k, i=i: seen[i].append(block_input(a, k)), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _feed_inputs(block: nn.Module, inputs: list[torch.Tensor]) -> Iterator[None]:
    """Replace `block`'s hidden-state input by `inputs[0]`, `inputs[1]`, ... on successive calls."""
    feed = iter(inputs)
    handle = block.register_forward_pre_hook(lambda _m, a, k: with_block_input(a, k, next(feed)), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def nll_without(model: nn.Module, positions: list[int], drop: int, inputs: list[torch.Tensor], ids: torch.Tensor,
                seq_len: int) -> float:
    """Mean calibration NLL of the model run with `positions` less the block at list index `drop`.

    `inputs` is that block's input on every batch of `mean_nll` (recorded with `positions`); the blocks
    before it are unchanged, so the run starts there: only the blocks after it are executed.
    """
    blocks = get_path(model, family_of(model).blocks)
    tail = positions[drop + 1:]
    if not tail:
        raise LayoutError("the last executed block cannot be eliminated")
    with running_blocks(model, tail), _feed_inputs(blocks[tail[0]], inputs):
        return mean_nll(model, ids, seq_len)


@torch.no_grad()
def elimination_path(model: nn.Module, ids: torch.Tensor, middle: list[int], seq_len: int, min_kept: int = 2,
                     max_ratio: float | None = None, progress: bool = False) -> tuple[float, list[Step]]:
    """Greedy elimination of inner middle blocks: (full model's mean NLL, the removals in order).

    Stops when `min_kept` middle blocks remain, or before the first removal whose emulator/full
    perplexity ratio would exceed `max_ratio`. Ties go to the lower block index (deterministic).
    """
    from tqdm.auto import tqdm

    if len(middle) < 2 or min_kept < 2:
        raise LayoutError("elimination keeps the middle's first and last block: it needs K >= 2 of >= 2 blocks")
    blocks = get_path(model, family_of(model).blocks)
    depth = len(blocks)
    kept = list(range(depth))
    was_training = model.training
    model.eval()
    try:
        full = None  # the first recording pass runs the whole model: its NLL is the full model's
        steps: list[Step] = []
        bar = tqdm(total=max(0, len(middle) - min_kept), desc="eliminate blocks", disable=not progress)
        while sum(1 for p in kept if p in middle) > min_kept:
            with running_blocks(model, kept), _record_inputs([blocks[p] for p in kept]) as seen:
                current = mean_nll(model, ids, seq_len)
            full = current if full is None else full
            candidates = [i for i, p in enumerate(kept) if p in middle[1:-1]]
            scored = [(nll_without(model, kept, i, seen[i], ids, seq_len), kept[i]) for i in candidates]
            nll, block = min(scored)
            if max_ratio is not None and math.exp(nll - full) > max_ratio:
                break
            kept.remove(block)
            steps.append(Step(block, nll - full))
            bar.update(1)
        bar.close()
        if full is None:
            full = mean_nll(model, ids, seq_len)
    finally:
        model.train(was_training)
    return full, steps


def kept_after(middle: list[int], steps: list[Step], kept: int) -> list[int]:
    """The middle blocks left when the path has removed len(middle) - kept of them."""
    removed = len(middle) - kept
    if not 0 <= removed <= len(steps):
        raise LayoutError(f"the elimination path removed {len(steps)} of {len(middle)} middle blocks; "
                          f"K={kept} needs {removed}")
    gone = {s.removed for s in steps[:removed]}
    return [b for b in middle if b not in gone]
