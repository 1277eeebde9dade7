"""The data owner tunes one adapter through two emulators at once: each step's loss is the mean of the adapter's
loss through emulator A and through emulator B, whose adapter blocks are A's own modules (one set of weights, the
gradients of both paths summed). The package, the plug-in and the rows are A's, as in the demo's round trip.

Why: through one emulator, part of what the bottom adapter learns repairs that emulator's own error on the data
owner's text (2026-12-06, perturbed bottom adapter), and that part hurts in the full model. Two emulators whose
middles err differently ask for different repairs; what they share is the task. Costs the data owner two
forward and backward passes a step (the same tokens), and ships the data owner two emulators.

    python experiments/two_emulators.py BUNDLE_A BUNDLE_B OUT [PRECISION [LR [SEED]]]   # defaults: auto 1e-3 42
writes OUT/rt.json like round_trip_bundle.py, with bundle_b.
"""
import sys
from pathlib import Path

import offsite_ds.roles.tune_adapter as tune_adapter
from offsite_ds.bundle import load_bundle
from offsite_ds.families import blocks_of

from demo_compare import run_round_trip

bundle_a, bundle_b, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
precision = sys.argv[4] if len(sys.argv) > 4 else "auto"
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3
seed = int(sys.argv[6]) if len(sys.argv) > 6 else 42
second: dict = {}


def load_both(path):
    """A, loaded for the tune role; B loaded beside it, frozen, its adapter blocks replaced by A's modules."""
    a = load_bundle(path)
    b = load_bundle(bundle_b)
    if sorted(a.position_to_original.values()) != sorted(b.position_to_original.values()):
        sys.exit(f"{bundle_b}: its adapter blocks {b.position_to_original} are not {path}'s {a.position_to_original}")
    b.model.requires_grad_(False)
    by_original = {o: p for p, o in a.position_to_original.items()}
    a_blocks, b_blocks = blocks_of(a.model), blocks_of(b.model)
    for p, o in b.position_to_original.items():
        b_blocks[p] = a_blocks[by_original[o]]
    second["model"] = b.model
    return a


def mean_loss(self, model, batch):
    """The mean of the causal-LM loss through A (the engine) and through B (both loaded in fp32 by load_bundle;
    the engine moves A to its device only, and B runs on the CPU beside it)."""
    loss_a, _ = tune_adapter.Role.compute_loss(self, model, batch)
    b = second["model"]
    b.train(self.model.training)
    out_b = b(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    return (loss_a + out_b.loss) / 2, {"loss_a": float(loss_a.detach()), "loss_b": float(out_b.loss.detach())}


tune_adapter.load_bundle = load_both
tune_adapter.TuneAdapter.compute_loss = mean_loss

run_round_trip(bundle_a, out, precision, lr, seed, bundle_b=str(bundle_b))
