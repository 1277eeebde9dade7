"""`offsite-ds distill MODEL --bundle BUNDLE --data CORPUS --out DISTILLED [--deepspeed ds_configs/zero3.json]`.

Under the launcher: `deepspeed --num_gpus G --module offsite_ds distill ...` (every rank runs this).
"""
from __future__ import annotations

import argparse

from offsite_ds.cli.train_args import (add_distill_loss_arguments, add_scale_arguments, add_train_arguments,
                                       distill_loss_from_args, finish, train_config_from_args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the owner's full model directory (the teacher's source)")
    p.add_argument("--bundle", required=True, help="layer-drop EmulatorBundle to distil (from `offsite-ds emulate`)")
    p.add_argument("--data", required=True, help="distillation corpus: .txt/.json/.jsonl/.parquet or a datasets name")
    p.add_argument("--out", required=True, help="directory of the distilled EmulatorBundle to write")
    add_distill_loss_arguments(p)
    p.add_argument("--eval-data", default=None, help="held-out corpus: distillation loss every --eval-every steps")
    p.add_argument("--max-eval-blocks", type=int, default=None, help="cap the held-out blocks (speed)")
    p.add_argument("--max-train-blocks", type=int, default=None, help="use only the first N packed blocks")
    add_train_arguments(p, lr=1e-4, batch_size=8, seq_len=512)
    p.set_defaults(warmup=2000)  # the original recipe: 2000 warm-up steps, then cosine
    add_scale_arguments(p)


def run(args: argparse.Namespace) -> int:
    from offsite_ds.roles.distill import distill

    cfg = train_config_from_args(args)
    summary = distill(args.model, args.bundle, args.data, args.out, cfg=cfg, seq_len=args.seq_len,
                      eval_data=args.eval_data,
                      text_field=args.text_field, max_train_blocks=args.max_train_blocks,
                      max_eval_blocks=args.max_eval_blocks, gradient_checkpointing=args.gradient_checkpointing,
                      **distill_loss_from_args(args))
    return finish(args, summary, "distilled emulator bundle")
