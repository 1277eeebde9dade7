"""The data owner's PEFT modes through the demo's emulator: LoRA, Houlsby adapters and BitFit at 2-8-2's size.

    python experiments/peft_modes_round_trip.py OUT [MODE:LR,LR,... ...]

SmolLM2-135M and Penn Treebank as the demo has them; the owner builds the demo's bundle once (`emulate`'s default
recipe at DemoSettings' layout and MLP width; whole-block 2-8-2 until 2026-12-07), or takes OUT/bundle as it is,
then the demo's data-owner budget (100 steps of 4 x 256 PTB train tokens, warm-up 6, seed 42, the emulator's best
validation adapter kept) runs once per mode and lr through `offsite_ds.demo.round_trip`, which scores the four rows
on the first 8,192 tokens of PTB valid and test. The lr of each mode is chosen on valid; test is reported. Writes
OUT/results.json (every run) as it goes and skips runs already there (resumable).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from offsite_ds.demo import DemoSettings, demo_inputs, round_trip
from offsite_ds.emulator import make_bundle

GRID = {"lora": (3e-4, 1e-3, 3e-3), "adapter": (3e-4, 1e-3, 3e-3), "bitfit": (1e-3, 3e-3, 1e-2)}


def main(out: Path, grid: dict[str, tuple[float, ...]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    model_dir, files, _ = demo_inputs()
    bundle = out / "bundle"
    if not (bundle / "offsite.json").exists():
        t = time.perf_counter()
        d = DemoSettings()
        make_bundle(model_dir, d.layout, bundle, select=d.select, mlp_width=d.mlp_width, log=print)
        results["emulate_s"] = time.perf_counter() - t
    for mode, lrs in grid.items():
        for lr in lrs:
            key = f"{mode}@{lr:g}"
            if key in results:
                continue
            s = DemoSettings(mode=mode, lr=lr, progress=False)
            trip = round_trip(model_dir, bundle, files["train"], {k: files[k] for k in ("valid", "test")},
                              out / key, s, log=print)
            results[key] = {"rows": trip["rows"], "tune_s": trip["tune_s"], "settings": {"mode": mode, "lr": lr},
                            "trainable": trip["summary"].get("trainable_params")}
            print(key, json.dumps(trip["rows"]), flush=True)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
    results_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    args = sys.argv[2:]
    main(Path(sys.argv[1]), {a.split(":")[0]: tuple(float(x) for x in a.split(":")[1].split(","))
                             for a in args} if args else GRID)
