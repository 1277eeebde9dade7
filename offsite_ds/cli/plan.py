"""`offsite-ds plan MODEL --gpus G [--nodes N] [--zero 2|3] [--offload]`: will it fit, before launching."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from offsite_ds.memory_plan import KNOWN_MODELS, LORA_R, ROLES

    p.add_argument("model", help=f"{', '.join(KNOWN_MODELS)}, or a local config.json / model directory")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3], help="ZeRO stage")
    p.add_argument("--offload", action="store_true", help="offload optimizer states (and, with ZeRO-3, parameters)"
                   " to CPU, as ds_configs/zero3_offload.json does")
    p.add_argument("--offload-optimizer-only", action="store_true", help="offload optimizer states only")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per GPU")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layout", default=None, help="L-K-R (default: the paper's for known models)")
    p.add_argument("--lora-r", type=int, default=LORA_R, help=f"LoRA rank for the FT+LoRA role ({LORA_R})")
    p.add_argument("--roles", default=",".join(ROLES), help=f"comma-separated subset of {', '.join(ROLES)}")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (80: A100/H100 80GB)")
    p.add_argument("--cpu-mem", type=float, default=512.0, help="GiB of CPU memory per node")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")


def run(args: argparse.Namespace) -> int:
    from offsite_ds.errors import OffsiteError
    from offsite_ds.memory_plan import ROLES, Setup, format_plan, plan

    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise OffsiteError(f"unknown role '{unknown[0]}'; choose from {', '.join(ROLES)}")
    if args.batch_size < 1 or args.seq_len < 1:
        raise OffsiteError("--batch-size and --seq-len must be >= 1")
    offload_opt = args.offload or args.offload_optimizer_only
    offload_params = args.offload and not args.offload_optimizer_only and args.zero == 3
    if offload_opt and args.zero < 2:
        raise OffsiteError("--offload needs --zero 2 or 3")
    setup = Setup(args.gpus, args.nodes, args.zero, offload_opt, offload_params, args.gradient_checkpointing,
                  args.batch_size, args.seq_len)
    result = plan(args.model, setup, args.layout, roles, args.gpu_mem, args.cpu_mem, args.lora_r)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0
