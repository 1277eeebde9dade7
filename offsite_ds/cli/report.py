"""`offsite-ds report --model M --bundle B --adapter A --data FILE`: the paper's rows for one round trip."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the owner's full model directory")
    p.add_argument("--bundle", required=True, help="the EmulatorBundle that was shipped")
    p.add_argument("--adapter", required=True, help="the AdapterPackage that came back")
    p.add_argument("--data", required=True, help="evaluation text (e.g. a WikiText/PTB test file)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the rows as JSON here")


def run(args: argparse.Namespace) -> int:
    from offsite_ds.atomic import write_json
    from offsite_ds.data import load_texts
    from offsite_ds.report import format_claims, format_rows, perplexity_rows

    rows = perplexity_rows(args.model, args.bundle, args.adapter, {"data": load_texts(args.data, args.text_field)},
                           seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens,
                           batch_size=args.batch_size)
    print(format_rows(rows, {"data": "perplexity"}))
    print()
    print(format_claims(rows))
    if args.json:
        write_json(args.json, {"perplexity": {name: values["data"] for name, values in rows.items()},
                               "data": str(args.data)})
    return 0
