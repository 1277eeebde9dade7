"""The data owner's learning rate through one bundle: the toolkit's round trip (offsite_ds.demo.round_trip, the demo's
budget otherwise) at each lr; prints one JSON line per lr.

    python experiments/data_owner_lr.py BUNDLE OUT LR [LR ...]
"""
import json, sys, time
from pathlib import Path
from offsite_ds.demo import DemoSettings, demo_inputs, round_trip

bundle, out, lrs = Path(sys.argv[1]), Path(sys.argv[2]), [float(x) for x in sys.argv[3:]]
model_dir, files, _ = demo_inputs()
for lr in lrs:
    t = time.time()
    trip = round_trip(model_dir, bundle, files["train"], {"valid": files["valid"], "test": files["test"]},
                      out / f"lr{lr:g}", DemoSettings(lr=lr, progress=False))
    print(json.dumps({"lr": lr, "rows": trip["rows"], "tune_s": trip["tune_s"], "wall_s": time.time() - t}), flush=True)
