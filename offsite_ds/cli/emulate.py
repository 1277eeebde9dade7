"""`offsite-ds emulate MODEL --layout L-K-R --out BUNDLE`."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face model directory (the owner's full model)")
    p.add_argument("--layout", required=True, help="L-K-R, e.g. 2-8-2 (or L-*-R with --keep-ratio)")
    p.add_argument("--keep-ratio", type=float, default=None, help="keep this fraction of the middle instead of K")
    p.add_argument("--out", required=True, help="EmulatorBundle directory to write")
    p.add_argument("--method", default="drop", choices=["drop", "prune", "quantize"],
                   help="compression of the middle: uniform layer-drop (paper), or the ablation's prune/quantize")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="--method prune: fraction of weights zeroed")
    p.add_argument("--bits", type=int, default=8, help="--method quantize: fake-quantisation bits")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the bundle's weights (default: the checkpoint's own, e.g. bf16 stays bf16)")


def run(args: argparse.Namespace) -> int:
    import json

    from offsite_ds.emulator import make_bundle

    out = make_bundle(args.model, args.layout, args.out, keep_ratio=args.keep_ratio, method=args.method,
                      prune_ratio=args.prune_ratio, quant_bits=args.bits, dtype=args.dtype)
    manifest = json.loads((out / "offsite.json").read_text())
    print(f"emulator bundle {out}: layout {manifest['layout']} of {manifest['base_depth']} blocks, "
          f"blocks kept {manifest['block_map']}, fingerprint {manifest['fingerprint'][:12]}")
    return 0
