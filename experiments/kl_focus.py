"""Per-token weighting of the KL phase toward the tokens where the emulator is furthest from the full model: each
training step's loss weighs a token's KL(full || emulator) by (its KL)^GAMMA, detached, normalised to mean 1 over
the rows of a head chunk (341 rows of SmolLM2's vocabulary), so the step's scale stays the unweighted one's.
Measurements (the held-out KL that decides whether the phase's change is kept, the guard, every perplexity) stay
unweighted. Why: the data owner's bottom adapter is spent repairing the emulator's error on its text; weighing the
tokens the emulator gets most wrong asks the middle to shrink the errors there is most to repair.

    python experiments/kl_focus.py OUT [SEED [BUDGET [GAMMA]]]     # 42, default, 1
Writes OUT/compare (compare-emulators' round trip at the seed, importance+fit at the demo's 2-12-2 at 0.54).
"""
import os
import sys
from pathlib import Path

import torch

import offsite_ds.fitting as fitting
from offsite_ds.evaluate import head_loss, token_kl

from demo_compare import run_demo_compare

out = Path(sys.argv[1])
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 42
budget = sys.argv[3] if len(sys.argv) > 3 else "default"
gamma = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
cache = Path(os.environ["OFFSITE_DS_CACHE"])


def focused_head_kl(student, teacher, head, transform=None, chunk_bytes=None):
    """evaluate.head_kl, with a training step's tokens weighed by their own KL^gamma (measurements unweighted)."""
    teacher = teacher.reshape(-1, teacher.shape[-1]).detach()

    def kl_sum(logits, rows, logits_of):
        with torch.no_grad():
            target = logits_of(teacher[rows])
        kl = token_kl(logits, target)
        if not logits.requires_grad:
            return kl.sum()
        w = kl.detach().clamp_min(0) ** gamma
        return (w * kl).sum() / w.mean().clamp_min(1e-12)

    return head_loss(student, head, kl_sum, transform, chunk_bytes) / teacher.shape[0]


fitting.head_kl = focused_head_kl
sys.exit(run_demo_compare(cache, budget, seed, out / "compare"))
