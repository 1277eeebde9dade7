"""`offsite-ds eval-table --model M --bundle B --adapter A [--ft FT] --tasks T1,T2 --out DIR`: the paper's table."""
from __future__ import annotations

import argparse


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The lm-eval flags `eval` and `eval-table` share."""
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task names (openbookqa,piqa,arc_easy,arc_challenge,hellaswag,sciq,"
                        "webqs,race: their datasets download when online), shipped local tasks (mmlu_demo, qa_demo, "
                        "prose_demo), .yaml task files or .jsonl files of question/choices/answer records")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="folder of local lm-eval YAML tasks (repeatable); works offline")
    p.add_argument("--limit", type=float, default=None,
                   help="evaluate only the first N examples of each task (a fraction when < 1), for quick looks")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, zero)")


def limit_value(limit: float | None) -> int | float | None:
    return int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the owner's full model directory")
    p.add_argument("--bundle", required=True, help="the EmulatorBundle that was shipped")
    p.add_argument("--adapter", required=True, help="the AdapterPackage that came back")
    p.add_argument("--ft", default=None, help="a fully fine-tuned model directory (the FT row; optional)")
    p.add_argument("--out", required=True, help="folder for <row>.json, table.json and table.md")
    add_task_arguments(p)
    p.add_argument("--ppl-data", default=None, help="text for a perplexity column (.txt/.json/.jsonl/.parquet)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: min(1024, model max))")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity on the first N tokens only")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="evaluation precision (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="shard a model that does not fit one GPU over all visible GPUs (accelerate)")


def run(args: argparse.Namespace) -> int:
    from offsite_ds.eval_table import EvalOptions, eval_table, format_table
    from offsite_ds.lm_eval_bridge import parse_task_list

    options = EvalOptions(tasks=parse_task_list(args.tasks) if args.tasks else [], include_path=args.include_path,
                          limit=limit_value(args.limit), batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                          device=args.device, dtype=args.dtype, device_map=args.device_map, ppl_data=args.ppl_data,
                          text_field=args.text_field, seq_len=args.seq_len, max_tokens=args.max_tokens)
    table = eval_table(args.model, args.bundle, args.adapter, args.out, options, ft_dir=args.ft)
    print(format_table(table))
    print(f"\nwritten: {args.out}/table.md, table.json and one JSON per row")
    return 0
