"""`offsite-ds finetune MODEL --data CORPUS --out FT_DIR [--lora] [--deepspeed ds_configs/zero3.json]`.

The paper's FT baseline (all weights) or FT+LoRA (LoRA on every block), exported as a plain HF model
directory. Under the launcher: `deepspeed --num_gpus G --module offsite_ds finetune ...`.
"""
from __future__ import annotations

import argparse

from offsite_ds.cli.train_args import add_scale_arguments, add_train_arguments, finish, train_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the owner's full model directory")
    p.add_argument("--data", required=True, help="training corpus: .txt/.json/.jsonl/.parquet or a datasets name")
    p.add_argument("--out", required=True, help="directory of the fine-tuned model to write (plain HF)")
    p.add_argument("--lora", action="store_true", help="FT+LoRA: LoRA on every block instead of all weights")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 4)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=None)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: the family's q/v)")
    p.add_argument("--eval-data", default=None, help="validation corpus: perplexity, best model kept")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="cap the validation tokens (speed)")
    p.add_argument("--max-train-blocks", type=int, default=None, help="use only the first N packed blocks")
    add_train_arguments(p, lr=2e-5, batch_size=8, seq_len=512)  # the original FT baseline's lr
    add_scale_arguments(p)


def run(args: argparse.Namespace) -> int:
    from offsite_ds.roles.finetune_full import finetune

    cfg = train_config_from_args(args)
    targets = [t.strip() for t in args.lora_targets.split(",")] if args.lora_targets else None
    settings = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": targets}
    summary = finetune(args.model, args.data, args.out, lora=args.lora, lora_settings=settings, cfg=cfg,
                       seq_len=args.seq_len, eval_data=args.eval_data, text_field=args.text_field,
                       max_train_blocks=args.max_train_blocks, max_eval_tokens=args.max_eval_tokens,
                       gradient_checkpointing=args.gradient_checkpointing)
    return finish(args, summary, "fine-tuned model (FT+LoRA, merged)" if args.lora else "fine-tuned model (FT)")
