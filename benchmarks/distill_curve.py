"""How much distillation is enough? Emulator and plug-in perplexity against distillation tokens.

The owner builds one emulator (`--select` at `--layout`) on its PUBLIC corpus, then distils it in
segments on the same public corpus: the bundle after `--points` tokens (cumulative) is the start of
the next segment (each segment warms up and decays its own cosine: warm restarts, different data
order per segment). At every point the emulator's zero-shot perplexity is scored on the public
held-out text and on the data owner's valid/test text (measurement only: no builder reads it), and at
`--round-trips` points the data owner's whole round trip runs (compare.round_trip: the same adapter and
budget as `offsite-ds compare-emulators`), giving the plug-in's perplexity at that amount of distillation.

    python benchmarks/distill_curve.py --out DIR [--layout 2-8-2 --select importance \
        --points 16384,49152,98304 --round-trips 0,98304]

Defaults: SmolLM2-135M, the Wikipedia sample in gensim (public), Penn Treebank (the data owner's).
Every point is cached in DIR/t<tokens>/result.json: an interrupted run resumes. Writes DIR/curve.json,
curve.md and curve.png.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from offsite_ds.atomic import save_figure, write_json, write_text
from offsite_ds.cli.train_args import add_distill_loss_arguments, distill_loss_from_args
from offsite_ds.atomic import cached
from offsite_ds.compare import CompareSettings, round_trip
from offsite_ds.demo import train_config
from offsite_ds.errors import OffsiteError


def _ints(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise OffsiteError(f"'{text}' is not a comma-separated list of token counts (e.g. 16384,49152)")
    if not values or values[0] < 0:
        raise OffsiteError(f"'{text}': token counts must be >= 0")
    return values


def emulator_ppl(bundle: Path, texts: dict[str, list[str]], s: CompareSettings) -> dict[str, float]:
    """The emulator's zero-shot perplexity on each text (the demo's evaluator and window)."""
    from offsite_ds.bundle import load_bundle
    from offsite_ds.evaluate import perplexity

    b = load_bundle(bundle)
    return {name: perplexity(b.model, b.tokenizer, t, seq_len=s.eval_seq_len, max_tokens=s.eval_tokens)
            for name, t in texts.items()}


def run_curve(model_dir: Path, public_train: Path, public_heldout: Path, train_file: Path,
              eval_files: dict[str, Path], out: Path, s: CompareSettings, select: str, points: list[int],
              trips: list[int], distill_batch: int, distill_seq_len: int, loss: dict, log=print) -> dict:
    """`loss`: distill()'s loss settings (kd_weight, lm_weight, kd_norm, logit_weight)."""
    from offsite_ds.data import load_texts
    from offsite_ds.emulator import make_bundle
    from offsite_ds.roles.distill import distill

    texts = {"public heldout": load_texts(public_heldout), **{k: load_texts(v) for k, v in eval_files.items()}}
    per_step = distill_batch * distill_seq_len
    points = sorted({0, *points})
    results = []
    previous = None
    for i, tokens in enumerate(points):
        here = out / f"t{tokens}"

        def make(tokens=tokens, here=here, previous=previous, i=i) -> dict:
            t = time.perf_counter()
            if tokens == 0:
                make_bundle(model_dir, s.layout, here / "bundle", select=select, calib_data=public_train,
                            calib_tokens=s.calib_tokens, importance=s.importance, progress=s.progress, log=log,
                            allow_far=True, fit=None)  # the selection alone: the curve is distillation's
                distill_s, summary = time.perf_counter() - t, None
            else:
                steps = max(1, round((tokens - previous["tokens"]) / per_step))
                cfg = replace(train_config(s, here / "checkpoints", steps, s.distill_lr, 0),
                              warmup_steps=min(3, steps - 1), batch_size=distill_batch, seed=s.seed + i)
                summary = distill(model_dir, out / f"t{previous['tokens']}" / "bundle", public_train, here / "bundle",
                                  cfg=cfg, seq_len=distill_seq_len, **loss)
                distill_s = time.perf_counter() - t
            log(f"[curve] {tokens} tokens: scoring the emulator")
            ppl = emulator_ppl(here / "bundle", texts, s)
            return {"tokens": tokens, "segment_s": distill_s, "emulator": ppl,
                    "distill": summary and {k: summary.get(k) for k in ("steps", "tokens", "final_loss",
                                                                        "final_metrics", "wall_seconds")}}

        result = cached(here, make)
        result["owner_s_total"] = result["segment_s"] + (previous["owner_s_total"] if previous else 0.0)
        if tokens in trips:
            log(f"[curve] {tokens} tokens: round trip")
            trip = cached(here / "trip", lambda here=here: round_trip(
                model_dir, here / "bundle", train_file, eval_files, here / "trip", s))
            result["round_trip"] = trip
        results.append(result)
        previous = result
    report = {"settings": {**asdict(s), "select": select, "distill_batch": distill_batch,
                           "distill_seq_len": distill_seq_len, **loss},
              "model": str(model_dir), "public_train": str(public_train), "public_heldout": str(public_heldout),
              "train": str(train_file), "eval": {k: str(v) for k, v in eval_files.items()}, "points": results}
    write_json(out / "curve.json", report)
    write_text(out / "curve.md", format_curve(results, list(texts)) + "\n")
    plot_curve(results, out / "curve.png")
    return report


def format_curve(results: list[dict], texts: list[str]) -> str:
    head = ["distill tokens", "owner s (cumulative)", *(f"emulator {t}" for t in texts),
            *(f"plug-in {s}" for s in texts if s != "public heldout"), *(f"OT emulator {s}" for s in texts
                                                                        if s != "public heldout")]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for r in results:
        trip = r.get("round_trip")
        splits = [s for s in texts if s != "public heldout"]
        cells = [str(r["tokens"]), f"{r['owner_s_total']:.0f}", *(f"{r['emulator'][t]:.2f}" for t in texts),
                 *((f"{trip['rows']['OT Plug-in'][s]:.2f}" if trip else "-") for s in splits),
                 *((f"{trip['rows']['OT Emulator'][s]:.2f}" if trip else "-") for s in splits)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [max(r["tokens"], 1) for r in results]
    for name in results[0]["emulator"]:
        ax.plot(x, [r["emulator"][name] for r in results], marker="o", label=f"emulator zero-shot, {name}")
    trips = [r for r in results if r.get("round_trip")]
    for split in (trips[0]["round_trip"]["rows"]["OT Plug-in"] if trips else {}):
        ax.plot([max(r["tokens"], 1) for r in trips], [r["round_trip"]["rows"]["OT Plug-in"][split] for r in trips],
                marker="s", ls="--", label=f"plug-in, {split}")
        ax.axhline(trips[0]["round_trip"]["rows"]["Full zero-shot"][split], color="k", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=1024)
    ax.set_xlim(left=0)
    ax.set_yscale("log")
    ax.set_xlabel("distillation tokens (public corpus)")
    ax.set_ylabel("perplexity (log); dotted: full model zero-shot")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    d = CompareSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="the owner's model directory (default: SmolLM2-135M)")
    p.add_argument("--layout", default="2-8-2")
    p.add_argument("--select", default="importance", choices=["uniform", "importance", "crash"])
    p.add_argument("--points", default="16384,49152,98304", help="cumulative distillation tokens to measure at")
    p.add_argument("--round-trips", default="0,98304",
                   help="token points at which the round trip also runs ('' for none)")
    p.add_argument("--distill-lr", type=float, default=5e-4)
    add_distill_loss_arguments(p)
    p.add_argument("--distill-batch", type=int, default=2)
    p.add_argument("--distill-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=d.steps, help="the data owner's tuning steps")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from offsite_ds.demo_assets import penn_treebank_file, smollm2_dir, wikipedia_file

    points, trips = _ints(args.points), (_ints(args.round_trips) if args.round_trips.strip() else [])
    if not set(trips) <= {0, *points}:
        raise OffsiteError(f"--round-trips {args.round_trips}: every value must be 0 or one of --points")
    s = CompareSettings(layout=args.layout, steps=args.steps, eval_tokens=args.eval_tokens,
                        distill_lr=args.distill_lr, progress=not args.no_progress)
    model = Path(args.model) if args.model else smollm2_dir(args.cache_dir)
    files = {split: penn_treebank_file(split, args.cache_dir) for split in ("train", "valid", "test")}
    report = run_curve(model, wikipedia_file("train", args.cache_dir), wikipedia_file("heldout", args.cache_dir),
                       files["train"], {"valid": files["valid"], "test": files["test"]}, Path(args.out), s,
                       args.select, points, trips, args.distill_batch, args.distill_seq_len,
                       distill_loss_from_args(args))
    print(format_curve(report["points"], ["public heldout", "valid", "test"]))
    finite = all(math.isfinite(v) for r in report["points"] for v in r["emulator"].values())
    return 0 if finite else 1


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main())
    except OffsiteError as exc:  # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
