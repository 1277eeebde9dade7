"""Record the distillation curve: `distill` logs eval metrics only to W&B, but it re-exports the bundle at every
improved evaluation with the metrics in offsite.json; this polls that manifest and appends each new point.

    python experiments/emulator_study/watch_distill.py OUT_BUNDLE_DIR CURVE.jsonl   (stops when OUT_BUNDLE_DIR.done exists)
"""
import json
import math
import sys
import time
from pathlib import Path

out, curve = Path(sys.argv[1]), Path(sys.argv[2])
seen = set()
while not out.with_name(out.name + ".done").exists():
    try:
        d = json.loads((out / "offsite.json").read_text())["compression"]["distillation"]
        ev = d.get("eval") or {}
        if d["steps"] not in seen and ev:
            seen.add(d["steps"])
            point = {"step": d["steps"], "tokens": d["tokens"], "wall_seconds": d["wall_seconds"], **ev,
                     "public_heldout_block_ppl": math.exp(ev["eval_lm_loss"]), "t": time.strftime("%H:%M:%S")}
            with curve.open("a") as f:
                f.write(json.dumps(point) + "\n")
    except (OSError, KeyError, json.JSONDecodeError):
        pass
    time.sleep(5)
