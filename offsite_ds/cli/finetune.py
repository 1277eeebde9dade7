"""`offsite-ds finetune MODEL --data CORPUS --out FT_DIR [--lora] [--deepspeed ds_configs/zero3.json]`.

The paper's FT baseline (all weights) or FT+LoRA (LoRA on every block), exported as a plain HF model
directory. Under the launcher: `deepspeed --num_gpus G --module offsite_ds finetune ...`.
"""
from __future__ import annotations

import argparse

from offsite_ds.cli.train_args import (add_lora_arguments, add_scale_arguments, add_train_arguments, finish,
                                       lora_settings_from_args, train_config_from_args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the owner's full model directory")
    p.add_argument("--data", required=True, help="training corpus: .txt/.json/.jsonl/.parquet or a datasets name")
    p.add_argument("--out", required=True, help="directory of the fine-tuned model to write (plain HF)")
    p.add_argument("--lora", action="store_true", help="FT+LoRA: LoRA on every block instead of all weights")
    add_lora_arguments(p)
    p.add_argument("--eval-data", default=None, help="validation corpus: perplexity, best model kept")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="cap the validation tokens (speed)")
    p.add_argument("--max-train-blocks", type=int, default=None, help="use only the first N packed blocks")
    add_train_arguments(p, lr=2e-5, batch_size=8, seq_len=512)  # the original FT baseline's lr
    add_scale_arguments(p)


def run(args: argparse.Namespace) -> int:
    from offsite_ds.roles.finetune_full import finetune

    cfg = train_config_from_args(args)
    settings = lora_settings_from_args(args) if args.lora else None
    summary = finetune(args.model, args.data, args.out, lora=args.lora, lora_settings=settings, cfg=cfg,
                       seq_len=args.seq_len, eval_data=args.eval_data, text_field=args.text_field,
                       max_train_blocks=args.max_train_blocks, max_eval_tokens=args.max_eval_tokens,
                       gradient_checkpointing=args.gradient_checkpointing)
    return finish(args, summary, "fine-tuned model (FT+LoRA, merged)" if args.lora else "fine-tuned model (FT)")
