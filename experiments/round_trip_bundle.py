"""The data owner's side of the demo for a bundle already built: tune with the demo's budget (100 steps of 4 x 256
PTB train tokens, full adapter tuning), plug in, and score the four rows on the first 8,192 tokens of PTB valid and
test. It measured the data owner's precision and lr on a `--fit` bundle without rebuilding it.

    python experiments/round_trip_bundle.py BUNDLE OUT [PRECISION [LR [SEED]]]   # defaults: auto 1e-3 42
writes OUT/rt.json: the rows, the precision that ran, tune/plugin/evaluate seconds and the wall time.
"""
import json
import sys
import time
from pathlib import Path

from offsite_ds.demo import DemoSettings, round_trip
from offsite_ds.demo_assets import penn_treebank_file, smollm2_dir

bundle, out = sys.argv[1], Path(sys.argv[2])
precision = sys.argv[3] if len(sys.argv) > 3 else "auto"
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 42
files = {s: penn_treebank_file(s) for s in ("train", "valid", "test")}
settings = DemoSettings(fit=True, lr=lr, precision=precision, seed=seed, progress=False)
t = time.perf_counter()
result = round_trip(smollm2_dir(), bundle, files["train"], {"valid": files["valid"], "test": files["test"]}, out,
                    settings, log=print)
record = {k: result[k] for k in ("rows", "tune_s", "plugin_s", "evaluate_s")}
record.update(precision=settings.precision, lr=lr, seed=seed, wall_s=time.perf_counter() - t)
(out / "rt.json").write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps(record, indent=1))
