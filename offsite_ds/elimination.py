"""Iterative block elimination on the owner's public text (SLEB, Song et al., ICML 2024).

One-shot importance scores each middle block dropped alone; at the paper's compression (18 of 26 blocks
removed on SmolLM2) what matters is how removals interact. Elimination removes one block at a time, the one
whose removal raises the calibration perplexity least, and re-scores every remaining block after each
removal. The path it walks (which block went at each step, and the emulator/full perplexity ratio after it)
is also the owner's fidelity knob: the fewest kept blocks whose ratio stays under a target
(`emulate --layout 2-*-2 --max-ratio 3`) is read off the same path.

Cost: each step is one sweep (offsite_ds.block_stream) of the current emulator and of every variant without
one remaining candidate: a variant shares the current emulator's states up to the block it leaves out and
runs only the blocks after it, which halves the work on average, and the model is read once per step (from
its shards when streamed). The middle's first and last block are never removed (they meet the adapter
blocks), as in the other rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from offsite_ds.block_stream import BlockSource, Path, as_source, open_stream, path_nlls
from offsite_ds.errors import LayoutError


@dataclass(frozen=True)
class Step:
    """One removal: the original block removed and the calibration NLL gap to the full model after it."""
    removed: int
    nll_gap: float

    @property
    def ratio(self) -> float:
        return math.exp(self.nll_gap)


@torch.no_grad()
def elimination_path(model: nn.Module | BlockSource, ids: torch.Tensor, middle: list[int], seq_len: int,
                     min_kept: int = 2, max_ratio: float | None = None, progress: bool = False,
                     checkpoints=None) -> tuple[float, list[Step]]:
    """Greedy elimination of inner middle blocks: (full model's mean NLL, the removals in order).

    Stops when `min_kept` middle blocks remain, or before the first removal whose emulator/full
    perplexity ratio would exceed `max_ratio`. Ties go to the lower block index (deterministic), so the path a
    stopped run kept in `checkpoints` (offsite_ds.fitting.FitCheckpoints, after each removal) goes on unchanged.
    """
    from tqdm.auto import tqdm

    if len(middle) < 2 or min_kept < 2:
        raise LayoutError("elimination keeps the middle's first and last block: it needs K >= 2 of >= 2 blocks")
    source = as_source(model)
    stream = open_stream(source, ids, seq_len)
    kept = list(range(source.depth))
    full = None  # the first sweep's base path is the whole model: its NLL is the full model's
    steps: list[Step] = []
    kept_path = checkpoints.load("elimination") if checkpoints is not None else None
    if kept_path is not None:  # the removals made before the run stopped
        full, steps = kept_path["full"], [Step(int(b), float(gap)) for b, gap in kept_path["steps"]]
        kept = [b for b in kept if b not in {st.removed for st in steps}]
    bar = tqdm(total=max(0, len(middle) - min_kept), initial=len(steps), desc="eliminate blocks",
               disable=not progress)
    while sum(1 for p in kept if p in middle) > min_kept:
        candidates = [p for p in kept if p in middle[1:-1]]
        variants = [Path(tuple(q for q in kept if q != c)) for c in candidates]
        if full is None:  # the trunk every variant forks from is the whole model: one more head pass
            full, *nlls = path_nlls(source, stream, [Path(tuple(kept))] + variants)
        else:
            nlls = path_nlls(source, stream, variants)
        nll, block = min(zip(nlls, candidates))
        if max_ratio is not None and math.exp(nll - full) > max_ratio:
            break
        kept.remove(block)
        steps.append(Step(block, nll - full))
        bar.update(1)
        if checkpoints is not None:
            checkpoints.save("elimination", {"full": full, "steps": [[st.removed, st.nll_gap] for st in steps]})
    bar.close()
    if full is None:
        full = path_nlls(source, stream, [Path(tuple(range(source.depth)))])[0]
    return full, steps


def kept_after(middle: list[int], steps: list[Step], kept: int) -> list[int]:
    """The middle blocks left when the path has removed len(middle) - kept of them."""
    removed = len(middle) - kept
    if not 0 <= removed <= len(steps):
        raise LayoutError(f"the elimination path removed {len(steps)} of {len(middle)} middle blocks; "
                          f"K={kept} needs {removed}")
    gone = {s.removed for s in steps[:removed]}
    return [b for b in middle if b not in gone]
