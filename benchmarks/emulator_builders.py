"""Calibration facts of the emulator builders on a real model: block importance, adjacent CKA, and the
zero-shot perplexity ratio (emulator / full) of each builder's choice on the owner's public text.

    python benchmarks/emulator_builders.py --model DIR --calib-data PUBLIC.txt --layouts 2-8-2,2-9-2 --out RESULTS_DIR

One load of the model; each emulator is the full model run with the chosen blocks (surgery.running_blocks),
so nothing is copied. Writes builders.json (and prints a table) - the guard threshold and the builders' defaults
are chosen from such measurements.
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

from transformers import AutoTokenizer

from offsite_ds import calibrate, surgery
from offsite_ds.atomic import write_json
from offsite_ds.runtime import load_model
from offsite_ds.families import depth_of
from offsite_ds.sandwich import (Layout, middle_indices, select_crash, select_important, select_kept,
                                 share_map_for)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-data", required=True)
    p.add_argument("--layouts", default="2-8-2,2-9-2")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--sample-tokens", type=int, default=2048)
    p.add_argument("--drop", action="store_true",
                   help="also score importance by dropping each middle block (one pass per block: slow on a CPU)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    t0 = time.perf_counter()
    model = load_model(args.model)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    ids, record = calibrate.calibration_ids(args.calib_data, tok, args.calib_tokens)
    seq_len = calibrate.calibration_seq_len(model)
    n = depth_of(model)
    first = Layout.parse(args.layouts.split(",")[0], n)
    middle = middle_indices(n, first)
    t = time.perf_counter()
    drop = calibrate.drop_importance(model, ids, middle, seq_len, progress=True) if args.drop else None
    drop_s = time.perf_counter() - t
    t = time.perf_counter()
    reps = calibrate.block_outputs(model, ids, seq_len, args.sample_tokens)
    cosine = calibrate.cosine_importance(reps, middle)
    similarity = calibrate.cka_matrix(reps[[i + 1 for i in middle]])
    cka_s = time.perf_counter() - t
    full_nll = calibrate.mean_nll(model, ids, seq_len)

    def ratio(positions: list[int]) -> float:
        with surgery.running_blocks(model, positions):
            return math.exp(calibrate.mean_nll(model, ids, seq_len) - full_nll)

    rows = []
    for spec in args.layouts.split(","):
        layout = Layout.parse(spec, n)
        assert middle_indices(n, layout) == middle, "all layouts must share the adapter blocks"
        bottom, top = list(range(layout.bottom)), list(range(n - layout.top, n))
        kept_c, clusters = select_crash(middle, layout.kept, similarity)
        choices = {"uniform": select_kept(middle, layout.kept),
                   "importance(cosine)": select_important(middle, layout.kept, cosine), "crash": kept_c}
        if drop is not None:
            choices["importance(drop)"] = select_important(middle, layout.kept, drop)
        for name, kept in choices.items():
            rows.append({"layout": spec, "select": name, "kept": kept, "ratio": ratio(bottom + kept + top)})
        stored = bottom + kept_c + top
        share = share_map_for(n, layout, clusters)
        rows.append({"layout": spec, "select": "crash+share", "kept": kept_c, "clusters": clusters,
                     "ratio": ratio([stored[s] for s in share])})
    result = {"model": args.model, "calibration": record, "calib_file": Path(args.calib_data).name,
              "full_ppl": math.exp(full_nll), "middle": middle, "drop_importance": drop,
              "cosine_importance": cosine, "adjacent_cka": [similarity[i][i + 1] for i in range(len(middle) - 1)],
              "rows": rows, "drop_importance_s": drop_s, "cka_s": cka_s, "total_s": time.perf_counter() - t0,
              "machine": f"{platform.machine()}, shared 2-core CPU (loaded by other jobs)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "builders.json", result)
    print(f"full ppl {result['full_ppl']:.2f} on {record['tokens']} tokens of {result['calib_file']}")
    for r in rows:
        print(f"{r['layout']} {r['select']:<20} ratio {r['ratio']:>10.2f}  kept {r['kept']}")
    print(f"drop importance {drop_s:.0f}s, CKA {cka_s:.0f}s, total {result['total_s']:.0f}s")


if __name__ == "__main__":
    main()
