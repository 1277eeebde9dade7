"""The sandwich split and the emulator's layer selection: pure functions of integers.

Layout `L-K-R` (the paper's notation, e.g. OT 2-8-2): the bottom L and top R blocks are the adapter,
the middle is uniformly layer-dropped to K blocks, always keeping its first and last block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from offsite_ds.errors import LayoutError


@dataclass(frozen=True)
class Layout:
    bottom: int
    kept: int
    top: int

    def __str__(self) -> str:
        return f"{self.bottom}-{self.kept}-{self.top}"

    @property
    def depth(self) -> int:
        """Depth of the emulator model: adapter blocks plus kept middle blocks."""
        return self.bottom + self.kept + self.top


def parse_layout(spec: str | None, n_layers: int, keep_ratio: float | None = None) -> Layout:
    """Parse 'L-K-R' (or 'L-*-R' with keep_ratio) and check it against a model of n_layers blocks."""
    if spec is None:
        raise LayoutError("no layout given: pass --layout L-K-R, e.g. --layout 2-8-2")
    m = re.fullmatch(r"\s*(\d+)-(\d+|\*)-(\d+)\s*", spec)
    if not m:
        raise LayoutError(f"layout '{spec}' is not of the form L-K-R (e.g. 2-8-2, or 2-*-2 with --keep-ratio)")
    bottom, top = int(m.group(1)), int(m.group(3))
    middle = n_layers - bottom - top
    if middle < 1:
        raise LayoutError(
            f"layout {spec}: {bottom}+{top} adapter blocks leave no middle in a {n_layers}-block model; "
            f"choose L+R <= {n_layers - 1}"
        )
    if m.group(2) == "*" or keep_ratio is not None:
        if keep_ratio is None:
            raise LayoutError(f"layout {spec} has '*' for K: pass --keep-ratio (0 < r <= 1)")
        if m.group(2) != "*":
            raise LayoutError("give K in --layout or --keep-ratio, not both (write L-*-R with --keep-ratio)")
        if not 0.0 < keep_ratio <= 1.0:
            raise LayoutError(f"--keep-ratio {keep_ratio} must be in (0, 1]")
        kept = max(1, round(middle * keep_ratio))
    else:
        kept = int(m.group(2))
    if not 1 <= kept <= middle:
        raise LayoutError(f"layout {spec}: K={kept} must be between 1 and the middle's size {middle}")
    return Layout(bottom, kept, top)


def middle_indices(n_layers: int, layout: Layout) -> list[int]:
    """Original indices of the middle (frozen, compressed) blocks."""
    return list(range(layout.bottom, n_layers - layout.top))


def adapter_indices(n_layers: int, layout: Layout) -> list[int]:
    """Original indices of the adapter blocks (bottom then top)."""
    return list(range(layout.bottom)) + list(range(n_layers - layout.top, n_layers))


def select_kept(middle: list[int], kept: int) -> list[int]:
    """Uniform layer-drop: element round(i*(n-1)/(K-1)) for i < K, so the first and last always stay.

    Python's round (banker's rounding) on purpose: it is what the original code used, so emulators match.
    """
    n = len(middle)
    if not 1 <= kept <= n:
        raise LayoutError(f"cannot keep {kept} of {n} middle blocks")
    if kept == 1:
        return [middle[0]]
    stride = (n - 1) / (kept - 1)
    return [middle[round(i * stride)] for i in range(kept)]


def emulator_block_map(n_layers: int, layout: Layout) -> list[int]:
    """For each emulator block (in order), the original block index it was copied from."""
    middle = middle_indices(n_layers, layout)
    top = list(range(n_layers - layout.top, n_layers))
    return list(range(layout.bottom)) + select_kept(middle, layout.kept) + top


def emulator_adapter_positions(layout: Layout) -> list[int]:
    """Emulator block positions that are adapter blocks (trainable on the data owner's side)."""
    return list(range(layout.bottom)) + list(range(layout.bottom + layout.kept, layout.depth))
