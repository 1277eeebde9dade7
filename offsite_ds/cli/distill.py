"""`offsite-ds distill MODEL --bundle BUNDLE --data CORPUS --out DISTILLED [--deepspeed ds_configs/zero3.json]`.

Under the launcher: `deepspeed --num_gpus G --module offsite_ds distill ...` (every rank runs this).
"""
from __future__ import annotations

import argparse
import json

from offsite_ds.cli.train_args import add_train_arguments, train_config_from_args


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the owner's large-model commands (distill, finetune)."""
    g = p.add_argument_group("scale")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, ~1/3 more compute)")
    g.add_argument("--torch-adam", action="store_true",
                   help="torch AdamW instead of DeepSpeed's fused/CPU Adam (no JIT op build: CPU try-outs, tests)")
    g.add_argument("--log-every", type=int, default=10, help="record the loss every N optimizer steps in the summary")
    g.add_argument("--summary-json", default=None, help="also write the training summary here (rank 0)")


def finish(args: argparse.Namespace, summary: dict, what: str) -> int:
    from offsite_ds.atomic import write_json
    from offsite_ds.train import dist_rank

    if dist_rank()[0] != 0:
        return 0
    if args.summary_json:
        write_json(args.summary_json, summary)
    final = summary["final_loss"]
    print(f"{what} {args.out}: {summary['steps']} steps, {summary['tokens']} tokens, "
          f"final loss {final:.4f}" if final is not None else f"{what} {args.out}: no step taken")
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_history"}), flush=True)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the owner's full model directory (the teacher's source)")
    p.add_argument("--bundle", required=True, help="layer-drop EmulatorBundle to distil (from `offsite-ds emulate`)")
    p.add_argument("--data", required=True, help="distillation corpus: .txt/.json/.jsonl/.parquet or a datasets name")
    p.add_argument("--out", required=True, help="directory of the distilled EmulatorBundle to write")
    p.add_argument("--kd-weight", type=float, default=30.0, help="weight of the normalised MSE to the teacher")
    p.add_argument("--lm-weight", type=float, default=1.0, help="weight of the emulator's causal-LM loss")
    p.add_argument("--eval-data", default=None, help="held-out corpus: distillation loss every --eval-every steps")
    p.add_argument("--max-eval-blocks", type=int, default=None, help="cap the held-out blocks (speed)")
    p.add_argument("--max-train-blocks", type=int, default=None, help="use only the first N packed blocks")
    add_train_arguments(p, lr=1e-4, batch_size=8, seq_len=512)
    p.set_defaults(warmup=2000)  # the original recipe: 2000 warm-up steps, then cosine
    add_scale_arguments(p)


def run(args: argparse.Namespace) -> int:
    from offsite_ds.roles.distill import distill

    cfg = train_config_from_args(args)
    cfg.extra["torch_adam"], cfg.log_every = args.torch_adam, args.log_every
    summary = distill(args.model, args.bundle, args.data, args.out, cfg=cfg, seq_len=args.seq_len,
                      kd_weight=args.kd_weight, lm_weight=args.lm_weight, eval_data=args.eval_data,
                      text_field=args.text_field, max_train_blocks=args.max_train_blocks,
                      max_eval_blocks=args.max_eval_blocks, gradient_checkpointing=args.gradient_checkpointing)
    return finish(args, summary, "distilled emulator bundle")
