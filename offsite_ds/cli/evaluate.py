"""`offsite-ds eval MODEL_DIR --data FILE`: perplexity of one model (a plain HF dir, bundle or plugged model)."""
from __future__ import annotations

import argparse

from offsite_ds.cli.eval_table import add_task_arguments, limit_value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory: plain HF, an EmulatorBundle, or a plugged-in model")
    p.add_argument("--data", default=None, help="text to score (.txt/.json/.jsonl/.parquet)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: min(1024, model max))")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: --seq-len)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, help="write the results as JSON here")
    add_task_arguments(p)


def run(args: argparse.Namespace) -> int:
    import math

    from offsite_ds.atomic import write_json
    from offsite_ds.data import load_texts
    from offsite_ds.errors import OffsiteError
    from offsite_ds.evaluate import perplexity
    from offsite_ds.plugin import load_model_dir

    if args.data is None and not getattr(args, "tasks", None):
        raise OffsiteError("nothing to evaluate: pass --data FILE (perplexity) or --tasks")
    model, tokenizer = load_model_dir(args.model)
    results: dict = {"model": str(args.model)}
    if args.data is not None:
        results["perplexity"] = perplexity(model, tokenizer, load_texts(args.data, args.text_field),
                                           seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
                                           batch_size=args.batch_size)
        if not math.isfinite(results["perplexity"]):
            raise OffsiteError(f"the model's perplexity on {args.data} is {results['perplexity']} (its weights "
                               "overflow or hold NaN); refusing to report it")
        print(f"perplexity {results['perplexity']:.3f} on {args.data}")
    if args.tasks:
        from offsite_ds.lm_eval_bridge import run_tasks

        results["tasks"] = run_tasks(model, tokenizer, args.tasks, include_path=args.include_path,
                                     limit=limit_value(args.limit), batch_size=args.batch_size,
                                     num_fewshot=args.num_fewshot)
        for name, r in results["tasks"].items():
            value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
            print(f"{name} {r['metric']} {value} ({r['n_samples']} of {r['n_docs']} examples)")
    if args.json:
        write_json(args.json, results)
    return 0
