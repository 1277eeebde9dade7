"""The data owner's side of the demo for a bundle already built: tune with the demo's budget (100 steps of 4 x 256
PTB train tokens, full adapter tuning), plug in, and score the four rows on the first 8,192 tokens of PTB valid and
test. It measured the data owner's precision and lr on a `--fit` bundle without rebuilding it.

    python experiments/round_trip_bundle.py BUNDLE OUT [PRECISION [LR [SEED]]]   # defaults: auto 1e-3 42
writes OUT/rt.json: the rows, the precision that ran, tune/plugin/evaluate seconds and the wall time.
"""
import sys
from pathlib import Path

from demo_compare import run_round_trip

bundle, out = sys.argv[1], Path(sys.argv[2])
precision = sys.argv[3] if len(sys.argv) > 3 else "auto"
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 42
run_round_trip(bundle, out, precision, lr, seed)
