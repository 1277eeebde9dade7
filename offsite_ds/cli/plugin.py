"""`offsite-ds plugin MODEL ADAPTER --out PLUGGED`."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the owner's full model directory")
    p.add_argument("adapter", help="AdapterPackage directory returned by the data owner")
    p.add_argument("--out", required=True, help="directory for the plugged-in model")


def run(args: argparse.Namespace) -> int:
    from offsite_ds.plugin import plugin

    out = plugin(args.model, args.adapter, args.out)
    print(f"plugged-in model written to {out}")
    return 0
