"""`offsite-ds bench`: throughput, peak memory and MFU of FT, FT+LoRA, OT, OT+LoRA, OT+LoRA+kernels.

Real shapes on a GPU (random weights from built-in configs, nothing downloaded), or `--smoke` for tiny
shapes of the same families and depths on a CPU (what CI runs).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from offsite_ds.errors import OffsiteError

HELP = "throughput / memory / MFU of FT, FT+LoRA, OT, OT+LoRA, OT+kernels"


def _int_list(text: str, flag: str, allow_max: bool = False) -> list:
    out = []
    for item in text.split(","):
        item = item.strip()
        if allow_max and item == "max":
            out.append("max")
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise OffsiteError(f"{flag} '{text}': give comma-separated positive integers"
                               + (" or 'max'" if allow_max else ""))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from offsite_ds.bench.runner import DEFAULT_SETTINGS
    from offsite_ds.bench.shapes import BUILTIN
    from offsite_ds.manifests import LoraSettings

    p.add_argument("--model", default="opt-1.3b",
                   help=f"comma-separated: {', '.join(BUILTIN)}, tiny-<family>[:depth], or a local config.json "
                        "/ model dir (default opt-1.3b)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help=f"comma-separated subset of {', '.join(DEFAULT_SETTINGS)} (default: all)")
    p.add_argument("--layout", default=None,
                   help="L-K-R for every model, or MODEL=L-K-R,... (default: the paper's: opt-1.3b 2-8-2, "
                        "gpt2-xl 2-16-2, opt-6.7b 2-18-2, bloom-7b1 2-12-2)")
    p.add_argument("--batch-size", default=None,
                   help="comma-separated micro-batch sizes, 'max' = largest that fits (default 1)")
    p.add_argument("--seq-len", default=None, help="comma-separated block lengths (default 512; 32 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps (default 20; 2 with --smoke)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 5; 1 with --smoke)")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results/<date>-<device>/)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes of the same family and depth, on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--weights", default="fp32", choices=("fp32", "bf16"),
                   help="master weight dtype (default fp32, as `offsite-ds tune` trains; compute is bf16 "
                        "autocast on CUDA either way)")
    lora = LoraSettings()
    p.add_argument("--lora-r", type=int, default=lora.r, help=f"LoRA rank (the paper's {lora.r})")
    p.add_argument("--lora-alpha", type=float, default=lora.alpha, help=f"LoRA alpha (the paper's {lora.alpha:g})")
    p.add_argument("--ft-offload", default="auto", choices=("auto", "on", "off"),
                   help="FT with ZeRO-3 CPU offload: auto = when FT does not fit the GPU (or runs out of memory)")
    p.add_argument("--ds-config", default=None, help="DeepSpeed config for offloaded FT "
                                                     "(default ds_configs/zero3_offload.json)")
    p.add_argument("--max-batch", type=int, default=64, help="upper bound of the 'max' batch search")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak (dense bf16 TFLOP/s) for MFU, when the built-in table does not know the GPU")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one process per case (default on CUDA)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="all cases in this process")
    p.add_argument("--seed", type=int, default=0)


def spec_from_args(args: argparse.Namespace):
    from offsite_ds.bench.runner import BenchSpec

    smoke = bool(args.smoke)
    device = "cpu" if smoke and args.device == "auto" else args.device
    return BenchSpec(
        models=[m.strip() for m in args.model.split(",") if m.strip()],
        settings=[s.strip() for s in args.settings.split(",") if s.strip()],
        layout=args.layout,
        batch_sizes=_int_list(args.batch_size, "--batch-size", allow_max=True) if args.batch_size else [1],
        seq_lens=_int_list(args.seq_len, "--seq-len") if args.seq_len else [32 if smoke else 512],
        steps=args.steps if args.steps is not None else (2 if smoke else 20),
        warmup=args.warmup if args.warmup is not None else (1 if smoke else 5),
        device=device, smoke=smoke, weights=args.weights, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        ft_offload=args.ft_offload, ds_config=args.ds_config, max_batch=args.max_batch,
        peak_tflops=args.peak_tflops, isolate=args.isolate, seed=args.seed)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every option spelled out (recorded in results.json)."""
    parts = ["offsite-ds", "bench"]
    for key, value in sorted(vars(args).items()):
        if key in ("command", "func") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "isolate":
            parts.append("--isolate" if value else "--no-isolate")
        elif value is True:
            parts.append(flag)
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def run(args: argparse.Namespace, command: str | None = None) -> int:
    from offsite_ds.bench.runner import run_suite

    if not args.model.strip():
        raise OffsiteError("--model is empty; name at least one model")
    spec = spec_from_args(args)
    command = command or command_line(args)
    results = run_suite(spec, args.out, command=command)
    out = results["out_dir"]
    print(f"results: {out}/results.json, {out}/results.md, {out}/plot.png")
    failed = [r for r in results["runs"] if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} case(s) failed with an error (see results.json)", file=sys.stderr)
        return 1
    return 0
