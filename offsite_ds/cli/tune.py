"""`offsite-ds tune BUNDLE --data FILE --out ADAPTER [--mode full|lora|adapter|bitfit] ...`."""
from __future__ import annotations

import argparse

from offsite_ds.cli.train_args import (add_lora_arguments, add_train_arguments, lora_settings_from_args,
                                       train_config_from_args)
from offsite_ds.manifests import DEFAULT_BOTTLENECK, MODES, ModeSettings
from offsite_ds.peft_modes import settings_for
from offsite_ds.roles.tune_adapter import DEFAULT_KERNELS, DEFAULT_TUNE_LR, tune


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="EmulatorBundle directory received from the model owner")
    p.add_argument("--data", default=None, help="private corpus: .txt/.json/.jsonl/.parquet or a datasets name")
    p.add_argument("--task", default=None,
                   help="instead of --data: tune on a task's examples, prompt masked out of the loss (an lm-eval "
                        "task name, a local YAML task, or a .jsonl of question/choices/answer records)")
    p.add_argument("--task-split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="folder of local lm-eval YAML tasks for --task (repeatable)")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N task examples")
    p.add_argument("--out", required=True, help="AdapterPackage directory to write (the best adapter)")
    p.add_argument("--mode", default="full", choices=MODES,
                   help="what trains inside the adapter blocks")
    add_lora_arguments(p)
    p.add_argument("--bottleneck", type=int, default=None,
                   help=f"Houlsby adapter bottleneck, at most the hidden size (default min({DEFAULT_BOTTLENECK}, hidden))")
    p.add_argument("--eval-data", default=None, help="validation corpus: emulator perplexity, best adapter kept")
    p.add_argument("--max-eval-tokens", type=int, default=None, help="cap the validation tokens (speed)")
    p.add_argument("--max-train-blocks", type=int, default=None, help="use only the first N packed blocks")
    p.add_argument("--kernels", default=DEFAULT_KERNELS,
                   help="fused kernels: auto (on CUDA: the library kernels measured best, else off), ours, liger, "
                        "cce or off (see the README's kernel section)")
    add_train_arguments(p, lr=None, batch_size=8, seq_len=512,
                        lr_help=f"AdamW peak learning rate (default: the lr the owner's probe recorded in the bundle "
                                f"for --mode, else {DEFAULT_TUNE_LR:g})")


def mode_settings(args: argparse.Namespace) -> ModeSettings:
    """The typed settings of --mode from its flags (the other modes' flags are not read)."""
    if args.mode == "lora":
        return lora_settings_from_args(args)
    if args.mode == "adapter":
        return settings_for("adapter", bottleneck=args.bottleneck)
    return settings_for(args.mode)


def run(args: argparse.Namespace) -> int:
    summary = tune(args.bundle, args.data, args.out, mode=args.mode, settings=mode_settings(args),
                   cfg=train_config_from_args(args), seq_len=args.seq_len, eval_data=args.eval_data,
                   text_field=args.text_field, kernels=args.kernels, max_train_blocks=args.max_train_blocks,
                   max_eval_tokens=args.max_eval_tokens, task=args.task, task_split=args.task_split,
                   include_path=args.include_path, max_examples=args.max_examples)
    best = summary.get("best_eval_loss")
    extra = f", best emulator eval loss {best:.4f} at step {summary['best_step']}" if best is not None else ""
    print(f"adapter package {args.out}: {summary['steps']} steps, {summary['tokens']} tokens, "
          f"final loss {summary['final_loss']:.4f}{extra}")
    return 0
