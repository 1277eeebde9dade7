"""`offsite-ds plugin MODEL ADAPTER --out PLUGGED [--bundle BUNDLE] [--check-data PUBLIC]`."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the owner's full model directory")
    p.add_argument("adapter", help="AdapterPackage directory returned by the data owner")
    p.add_argument("--out", required=True, help="directory for the plugged-in model")
    p.add_argument("--bundle", default=None,
                   help="the emulator bundle you shipped: needed when it was aligned (emulate --fit-align)")
    p.add_argument("--check-data", default=None,
                   help="the owner's public text: score the plug-in against the full model and warn when it got worse")
    p.add_argument("--check-tokens", type=int, default=None, help="tokens of --check-data to score (1024)")
    p.add_argument("--text-field", default="text")


def run(args: argparse.Namespace) -> int:
    import json

    from offsite_ds.plugin import plugin
    from offsite_ds.runtime import return_freed_memory

    return_freed_memory()  # the model is streamed shard by shard: freed buffers go back to the OS

    out = plugin(args.model, args.adapter, args.out, check_data=args.check_data, check_tokens=args.check_tokens,
                 text_field=args.text_field, bundle_dir=args.bundle)
    print(f"plugged-in model written to {out}")
    check = json.loads((out / "offsite.json").read_text()).get("check")
    if check:
        print(f"perplexity on {check['tokens']} tokens of {args.check_data}: plug-in {check['plugged_ppl']:.2f}, "
              f"full model {check['full_ppl']:.2f}")
    return 0
