"""Slack in the emulator: does the bottom adapter stop spending its tuning on the emulator's error if something else
can absorb it? The data owner tunes the adapter blocks AND a part of the emulator's middle (the slack: its norms'
gains, or all its weights); only the adapter blocks are exported, so the plug-in and the OT Emulator row carry the
adapter alone. Otherwise the demo's round trip (experiments/round_trip_bundle.py): 100 steps of 4 x 256 PTB train
tokens, full adapter tuning, then the four rows on the first 8,192 tokens of PTB valid and test.

    python experiments/emulator_slack.py BUNDLE OUT SLACK [LR [SEED]]   # SLACK: none, norms or all; 1e-3 42
writes OUT/rt.json: the rows, the slack, its trainable size, tune/plugin/evaluate seconds.
"""
import json
import sys
import time
from pathlib import Path

import offsite_ds.roles.tune_adapter as tune_adapter
from offsite_ds.demo import DemoSettings, round_trip
from offsite_ds.demo_assets import penn_treebank_file, smollm2_dir
from offsite_ds.families import block_prefix, blocks_of, family_of

bundle, out, slack = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 42
if slack not in ("none", "norms", "all"):
    sys.exit(f"SLACK {slack} must be none, norms or all")
original_apply, original_state = tune_adapter.apply_mode, tune_adapter.trainable_state
state = {"slack_params": 0, "adapter": None}


def apply_mode(model, positions, mode="full", settings=None):
    resolved = original_apply(model, positions, mode, settings)
    family = family_of(model)
    state["adapter"] = (family, set(positions))
    for i, block in enumerate(blocks_of(model)):
        if i in positions or slack == "none":
            continue
        for name, p in block.named_parameters():
            if slack == "all" or "norm" in name:
                p.requires_grad_(True)
                state["slack_params"] += p.numel()
    return resolved


def trainable_state(model):
    """The adapter blocks' tensors only: the slack stays with the data owner."""
    family, positions = state["adapter"]
    kept = tuple(block_prefix(family, p) for p in positions)
    return {n: t for n, t in original_state(model).items() if n.startswith(kept)}


tune_adapter.apply_mode, tune_adapter.trainable_state = apply_mode, trainable_state
files = {s: penn_treebank_file(s) for s in ("train", "valid", "test")}
settings = DemoSettings(fit=True, lr=lr, precision="bf16", seed=seed, progress=False)
t = time.perf_counter()
result = round_trip(smollm2_dir(), bundle, files["train"], {"valid": files["valid"], "test": files["test"]}, out,
                    settings, log=print)
record = {k: result[k] for k in ("rows", "tune_s", "plugin_s", "evaluate_s")}
record.update(slack=slack, slack_params=state["slack_params"], lr=lr, seed=seed, wall_s=time.perf_counter() - t)
(out / "rt.json").write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps(record, indent=1))
