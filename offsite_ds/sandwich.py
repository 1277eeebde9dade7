"""The sandwich split and the emulator's layer selection: pure functions of integers.

Layout `L-K-R` (the paper's notation, e.g. OT 2-8-2): the bottom L and top R blocks are the adapter,
the middle is uniformly layer-dropped to K blocks, always keeping its first and last block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from offsite_ds.errors import LayoutError


_SPEC = re.compile(r"\s*(\d+)-(\d+|\*)-(\d+)\s*")


@dataclass(frozen=True)
class Layout:
    """An L-K-R split; the one place that parses the spelling and knows which emulator blocks are adapters."""
    bottom: int
    kept: int
    top: int

    def __str__(self) -> str:
        return f"{self.bottom}-{self.kept}-{self.top}"

    @property
    def depth(self) -> int:
        """Depth of the emulator model: adapter blocks plus kept middle blocks."""
        return self.bottom + self.kept + self.top

    @property
    def adapter_positions(self) -> list[int]:
        """Emulator block positions that are adapter blocks (trainable on the data owner's side)."""
        return list(range(self.bottom)) + list(range(self.bottom + self.kept, self.depth))

    @classmethod
    def parse(cls, spec: str | None, n_layers: int, keep_ratio: float | None = None,
              upper_bound: bool = False) -> Layout:
        """Parse 'L-K-R' (or 'L-*-R' with keep_ratio) and check it against a model of n_layers blocks.

        `upper_bound` (a fidelity target will choose K): K is at most the given one, and '*' means the whole
        middle. The CLI, the manifests and the benchmarks all read layouts here, so they refuse the same ones.
        """
        if spec is None:
            raise LayoutError("no layout given: pass --layout L-K-R, e.g. --layout 2-8-2")
        m = _SPEC.fullmatch(spec)
        if not m:
            raise LayoutError(f"layout '{spec}' is not of the form L-K-R (e.g. 2-8-2, or 2-*-2 with --keep-ratio)")
        bottom, top = int(m.group(1)), int(m.group(3))
        middle = n_layers - bottom - top
        if middle < 1:
            raise LayoutError(
                f"layout {spec}: {bottom}+{top} adapter blocks leave no middle in a {n_layers}-block model; "
                f"choose L+R <= {n_layers - 1}"
            )
        if m.group(2) == "*" and upper_bound and keep_ratio is None:
            kept = middle
        elif m.group(2) == "*" or keep_ratio is not None:
            if keep_ratio is None:
                raise LayoutError(f"layout {spec} has '*' for K: pass --keep-ratio (0 < r <= 1) or --max-ratio R "
                                  "(the fewest blocks whose emulator stays within R x the full model's perplexity)")
            if m.group(2) != "*":
                raise LayoutError("give K in --layout or --keep-ratio, not both (write L-*-R with --keep-ratio)")
            if not 0.0 < keep_ratio <= 1.0:
                raise LayoutError(f"--keep-ratio {keep_ratio} must be in (0, 1]")
            kept = max(1, round(middle * keep_ratio))
        else:
            kept = int(m.group(2))
        if not 1 <= kept <= middle:
            raise LayoutError(f"layout {spec}: K={kept} must be between 1 and the middle's size {middle}")
        return cls(bottom, kept, top)

    def with_kept(self, kept: int) -> Layout:
        """The same adapter blocks around another number of kept middle blocks."""
        return Layout(self.bottom, kept, self.top)


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
    return block_map_for(n_layers, layout, select_kept(middle_indices(n_layers, layout), layout.kept))


# ------------------------------------------------------------------------- calibrated selection rules
# Pure functions of scores / similarity matrices (offsite_ds.calibrate measures them on the owner's text).

SELECTIONS = ("uniform", "importance", "crash", "iterative")


def select_important(middle: list[int], kept: int, scores: list[float]) -> list[int]:
    """Importance-aware drop: the middle's first and last block, plus the K-2 highest-scoring others.

    `scores[i]` is how much removing `middle[i]` hurts (higher = more important). The two ends stay
    because they meet the adapter blocks the data owner trains. Ties go to the lower index (deterministic).
    """
    n = len(middle)
    if len(scores) != n:
        raise LayoutError(f"{len(scores)} importance scores for {n} middle blocks")
    if not 1 <= kept <= n:
        raise LayoutError(f"cannot keep {kept} of {n} middle blocks")
    if kept == 1:
        return [middle[0]]
    inner = sorted(range(1, n - 1), key=lambda i: (-scores[i], i))[: kept - 2]
    return [middle[i] for i in sorted({0, n - 1, *inner})]


def _linkage(similarity: list[list[float]], a: list[int], b: list[int]) -> float:
    """Average linkage: the mean similarity over all pairs across two clusters."""
    return sum(similarity[i][j] for i in a for j in b) / (len(a) * len(b))


def merge_adjacent(similarity: list[list[float]], k: int) -> list[list[int]]:
    """CRaSh clustering: agglomerative merging of ADJACENT blocks into k contiguous clusters.

    Starting from one cluster per block, repeatedly merge the neighbouring pair with the highest
    average-linkage similarity (CKA) until k remain; ties merge the leftmost pair. Only neighbours merge,
    so every cluster is a run of consecutive blocks that one kept block can stand in for.
    """
    n = len(similarity)
    if any(len(row) != n for row in similarity):
        raise LayoutError("the similarity matrix must be square")
    if not 1 <= k <= n:
        raise LayoutError(f"cannot make {k} clusters of {n} middle blocks")
    clusters = [[i] for i in range(n)]
    while len(clusters) > k:
        links = [_linkage(similarity, clusters[i], clusters[i + 1]) for i in range(len(clusters) - 1)]
        best = max(range(len(links)), key=lambda i: (links[i], -i))
        clusters[best:best + 2] = [clusters[best] + clusters[best + 1]]
    return clusters


def cluster_representatives(clusters: list[list[int]]) -> list[int]:
    """The block kept for each run: its LAST block (the run's output is what the blocks after it read),
    except that the middle's first block stays (it meets the bottom adapter blocks, as in the other rules).

    Measured on SmolLM2-135M 2-9-2 (calibration perplexity ratio to the full model, 1,024 Wikipedia tokens,
    benchmarks/results/2026-11-23-e1-builders-smollm2): first/last block kept + each run's last 272x; + each run's first
    429x; each run's last 2,192x, first 1,149x, medoid (highest mean CKA) 2,984x; uniform drop 73x.
    """
    if len(clusters) == 1:
        return [clusters[0][0]]
    return [clusters[0][0]] + [c[-1] for c in clusters[1:]]


def select_crash(middle: list[int], kept: int, similarity: list[list[float]]) -> tuple[list[int], list[list[int]]]:
    """CRaSh selection: K runs of adjacent middle blocks merged by CKA, one kept block each.

    Returns the kept original indices and the runs (as original indices), in order.
    """
    if len(similarity) != len(middle):
        raise LayoutError(f"a {len(similarity)}x{len(similarity)} similarity matrix for {len(middle)} middle blocks")
    clusters = merge_adjacent(similarity, kept)
    return [middle[i] for i in cluster_representatives(clusters)], [[middle[i] for i in c] for c in clusters]


def block_map_for(n_layers: int, layout: Layout, kept_middle: list[int]) -> list[int]:
    """Emulator block map (stored position -> original index) for a chosen set of kept middle blocks."""
    middle = middle_indices(n_layers, layout)
    if len(kept_middle) != layout.kept or kept_middle != sorted(set(middle) & set(kept_middle)):
        raise LayoutError(f"kept blocks {kept_middle} are not {layout.kept} distinct middle blocks in order")
    return list(range(layout.bottom)) + list(kept_middle) + list(range(n_layers - layout.top, n_layers))


def share_map_for(n_layers: int, layout: Layout, clusters: list[list[int]]) -> list[int]:
    """CRaSh sharing: for each ORIGINAL position, the stored block it runs (its cluster's kept block).

    Adapter positions map to themselves; the emulator keeps the full depth with K middle blocks of weights.
    """
    if len(clusters) != layout.kept or [i for c in clusters for i in c] != middle_indices(n_layers, layout):
        raise LayoutError("clusters must partition the middle, in order, into K runs")
    shared = [layout.bottom + k for k, c in enumerate(clusters) for _ in c]
    top = [layout.bottom + layout.kept + j for j in range(layout.top)]
    return list(range(layout.bottom)) + shared + top
