"""Emulator fidelity of the block-selection builders on a real model: the emulator/full perplexity ratio on
held-out text at each K, and what each builder costs the owner.

    python benchmarks/fidelity.py --out DIR [--model DIR] [--layout 2-8-2] [--calib-tokens 1024]

Blocks are chosen on the first --calib-tokens of the owner's public train text; the ratios are measured on
text the choice never saw: the public held-out split, and the data owner's validation split (Penn Treebank
valid by default; choosing settings there, reporting on test, is the comparison's job). `iterative` walks
its elimination path once down to K and is scored at every K of --ks on the way; `importance` is scored at
the same Ks. Defaults: SmolLM2-135M and PTB from the demo packages. Writes fidelity.json, fidelity.md and
meta.json (benchmarks/results_index.py: commit, command, versions, device, input fingerprints).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from offsite_ds import calibrate
from offsite_ds.atomic import write_json, write_text
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.elimination import elimination_path, kept_after
from offsite_ds.families import depth_of
from offsite_ds.runtime import load_model
from offsite_ds.sandwich import Layout, block_map_for, middle_indices, select_important, select_kept
from offsite_ds.surgery import running_blocks
from results_index import write_meta  # benchmarks/, first on sys.path when run as a script


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M from the demo package)")
    p.add_argument("--public-train", default=None, help="owner's public text (default: the Wikipedia sample)")
    p.add_argument("--public-heldout", default=None, help="held-out public text (default: its held-out split)")
    p.add_argument("--valid", default=None, help="data owner's validation text (default: PTB valid)")
    p.add_argument("--layout", default="2-8-2")
    p.add_argument("--ks", default="8,9,10,12,14,18", help="K values scored (each >= the layout's K)")
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from offsite_ds import demo_assets
    from results_index import git_output

    commit = git_output("rev-parse", "HEAD")  # the code that runs: HEAD may move during an hour-long run

    model_dir = args.model or demo_assets.smollm2_dir()
    public_train = args.public_train or demo_assets.wikipedia_file("train")
    public_heldout = args.public_heldout or demo_assets.wikipedia_file("heldout")
    valid = args.valid or demo_assets.penn_treebank_file("valid")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = load_model(model_dir).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    calib, record = calibrate.calibration_ids(public_train, tok, args.calib_tokens)
    evals = {"public_heldout": tokenize_corpus(load_texts(public_heldout), tok)[:args.eval_tokens],
             "valid": tokenize_corpus(load_texts(valid), tok)[:args.eval_tokens]}
    seq_len = calibrate.calibration_seq_len(model)
    n = depth_of(model)
    layout = Layout.parse(args.layout, n)
    middle = middle_indices(n, layout)
    ks = sorted({int(k) for k in args.ks.split(",")} | {layout.kept}, reverse=True)
    full = {name: calibrate.mean_nll(model, ids, seq_len) for name, ids in evals.items()}

    def ratios(kept: list[int], k: int) -> dict:
        bm = block_map_for(n, Layout.parse(f"{layout.bottom}-{k}-{layout.top}", n), kept)
        with running_blocks(model, bm):
            return {name: math.exp(calibrate.mean_nll(model, ids, seq_len) - full[name]) for name, ids in evals.items()}

    rows, costs = [], {}
    cpu, wall = time.process_time(), time.perf_counter()
    scores = calibrate.drop_importance(model, calib, middle, seq_len, progress=True)
    costs["importance"] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    cpu, wall = time.process_time(), time.perf_counter()
    _, steps = elimination_path(model, calib, middle, seq_len, min_kept=layout.kept, progress=True)
    costs["iterative"] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    for k in ks:
        if k > len(middle):
            continue
        for name, kept in (("uniform", select_kept(middle, k)), ("importance", select_important(middle, k, scores)),
                           ("iterative", kept_after(middle, steps, k))):
            row = {"K": k, "builder": name, "kept": kept, **ratios(kept, k)}
            rows.append(row)
            print(f"K={k:>2} {name:<10} held-out public {row['public_heldout']:>9.2f}x  valid {row['valid']:>9.2f}x",
                  flush=True)
    result = {"model": str(model_dir), "layout": args.layout, "calibration": record, "seq_len": seq_len,
              "eval_tokens": {k: int(v.numel()) for k, v in evals.items()},
              "full_ppl": {k: math.exp(v) for k, v in full.items()}, "rows": rows, "costs": costs,
              "elimination": [{"removed": s.removed, "calib_ratio": s.ratio} for s in steps]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fidelity.json", result)
    write_meta(out, f"emulator/full perplexity ratio per builder and K ({args.layout}), owner cost",
               " ".join(["python", "benchmarks/fidelity.py", *argv]),
               [str(public_train), str(public_heldout), str(valid)], ["benchmarks/fidelity.py"], commit=commit)
    lines = [f"# Emulator fidelity, {Path(str(model_dir)).name}, middle of {len(middle)} blocks",
             "", f"Emulator/full perplexity ratio; blocks chosen on {record['tokens']} public train tokens; "
             f"full model: {result['full_ppl']['public_heldout']:.2f} public held-out, "
             f"{result['full_ppl']['valid']:.2f} valid ({args.eval_tokens} tokens each).", "",
             "| K | builder | public held-out | valid | kept |", "| ---: | --- | ---: | ---: | --- |"]
    lines += [f"| {r['K']} | {r['builder']} | {r['public_heldout']:.2f}x | {r['valid']:.2f}x | {r['kept']} |"
              for r in rows]
    lines += ["", "Owner cost (CPU seconds of this process; wall seconds):", ""]
    lines += [f"- {k}: {v['cpu_s']:.0f} CPU s, {v['wall_s']:.0f} s wall" for k, v in costs.items()]
    write_text(out / "fidelity.md", "\n".join(lines) + "\n")
    print(json.dumps(costs))


if __name__ == "__main__":
    main()
