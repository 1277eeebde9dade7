"""Training flags shared by every command that trains (tune, distill, finetune): one definition."""
from __future__ import annotations

import argparse
import json

from offsite_ds.runtime import PRECISIONS
from offsite_ds.train import TrainConfig


def add_train_arguments(p: argparse.ArgumentParser, lr: float | None = 1e-4, batch_size: int = 8,
                        seq_len: int = 512, lr_help: str | None = None) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--lr", type=float, default=lr, help=lr_help or f"AdamW peak learning rate ({lr:g})")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=int, default=0, help="warm-up optimizer steps before cosine decay")
    g.add_argument("--batch-size", type=int, default=batch_size, help="micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seq-len", type=int, default=seq_len)
    g.add_argument("--text-field", default="text", help="field holding the text in .json/.jsonl/.parquet data")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N optimizer steps (and at the end)")
    g.add_argument("--save-every", type=int, default=0, help="resumable checkpoint every N optimizer steps")
    g.add_argument("--checkpoint-dir", default=None, help="default: OUT.checkpoints beside --out")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    g.add_argument("--deepspeed", default=None, metavar="DS_CONFIG", help="train with a DeepSpeed engine")
    g.add_argument("--torch-adam", action="store_true",
                   help="with --deepspeed: torch AdamW instead of DeepSpeed's fused/CPU Adam (no JIT op build)")
    g.add_argument("--precision", default=TrainConfig.precision, choices=PRECISIONS,
                   help="autocast: auto is bf16 on CUDA, fp32 on CPU")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", default="offsite-ds")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(args, name) < 1:
            from offsite_ds.errors import OffsiteError

            raise OffsiteError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    return TrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_steps=args.warmup, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       max_grad_norm=args.max_grad_norm, seed=args.seed, eval_every=args.eval_every,
                       save_every=args.save_every, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                       deepspeed=args.deepspeed, precision=args.precision, wandb=args.wandb,
                       wandb_project=args.wandb_project, progress=not args.no_progress,
                       torch_adam=args.torch_adam, log_every=getattr(args, "log_every", 10))


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the owner's large-model commands (distill, finetune)."""
    g = p.add_argument_group("scale")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, ~1/3 more compute)")
    g.add_argument("--log-every", type=int, default=10, help="record the loss every N optimizer steps in the summary")
    g.add_argument("--summary-json", default=None, help="also write the training summary here (rank 0)")


def finish(args: argparse.Namespace, summary: dict, what: str) -> int:
    """Rank 0 prints the summary line (and writes --summary-json) of an owner's training command."""
    from offsite_ds.atomic import write_json
    from offsite_ds.runtime import rank_and_world

    if rank_and_world()[0] != 0:
        return 0
    if args.summary_json:
        write_json(args.summary_json, summary)
    final = summary["final_loss"]
    print(f"{what} {args.out}: {summary['steps']} steps, {summary['tokens']} tokens, "
          f"final loss {final:.4f}" if final is not None else f"{what} {args.out}: no step taken")
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_history"}), flush=True)
    return 0


def add_distill_loss_arguments(p: argparse.ArgumentParser) -> None:
    """The distillation loss flags of `distill`, `compare-emulators` (+distill builders) and the curve benchmark."""
    from offsite_ds.roles.distill import DEFAULT_KD_WEIGHT, DEFAULT_LM_WEIGHT, KD_NORMS

    g = p.add_argument_group("distillation loss")
    g.add_argument("--kd-weight", type=float, default=DEFAULT_KD_WEIGHT,
                   help="weight of the normalised MSE to the teacher")
    g.add_argument("--lm-weight", type=float, default=DEFAULT_LM_WEIGHT, help="weight of the emulator's causal-LM loss")
    g.add_argument("--kd-norm", default=KD_NORMS[0], choices=KD_NORMS,
                   help="normalise the MSE by the teacher's total energy (global, the original) or per token "
                        "(token: attention-sink tokens cannot dominate)")
    g.add_argument("--logit-weight", type=float, default=0.0,
                   help="weight of KL(full model || emulator) of the next-token distributions (0: off)")


def distill_loss_from_args(args: argparse.Namespace) -> dict:
    """distill()'s loss keyword arguments from the flags of add_distill_loss_arguments."""
    return {"kd_weight": args.kd_weight, "lm_weight": args.lm_weight, "kd_norm": args.kd_norm,
            "logit_weight": args.logit_weight}


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """The LoRA flags of `tune --mode lora` and `finetune --lora`; defaults and help read from LoraSettings."""
    from offsite_ds.manifests import LoraSettings

    d = LoraSettings()
    p.add_argument("--lora-r", type=int, default=d.r, help=f"LoRA rank ({d.r})")
    p.add_argument("--lora-alpha", type=float, default=d.alpha, help=f"LoRA alpha ({d.alpha:g})")
    p.add_argument("--lora-dropout", type=float, default=d.dropout, help=f"LoRA dropout ({d.dropout:g})")
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: the family's q/v)")


def lora_settings_from_args(args: argparse.Namespace):
    """LoraSettings from the flags of add_lora_arguments (a bad value: one line, before anything loads)."""
    from offsite_ds.peft_modes import settings_for

    targets = [t.strip() for t in args.lora_targets.split(",")] if args.lora_targets else None
    return settings_for("lora", r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)


def add_fit_arguments(p: argparse.ArgumentParser, who: str) -> None:
    """The block-fitting flags (FitSettings) of `emulate --fit` and the +fit builders of `compare-emulators`: a named
    budget (FIT_BUDGETS), and flags over it. Their parsed default is None, "the budget's"; help shows FitSettings'."""
    from offsite_ds.fitting import FIT_BUDGETS, FIT_TEXTS, KL_LR, FitSettings

    d = FitSettings()
    g = p.add_argument_group(f"block fitting ({who})")
    g.add_argument("--fit-budget", choices=list(FIT_BUDGETS), default="default",
                   help="the owner's budget, the settings below in one name (SmolLM2-135M at the demo's layout, "
                        "2-core CPU: default 6 min, PTB valid 6.3x the full model; mid 14 min, 4.9x; half-hour 29 min, "
                        "4.1x, all weights; hour 53 min, 4.1x, all weights, the best plug-in; README 'Owner "
                        "budgets'); a flag below sets its field over it (default)")
    g.add_argument("--fit-tokens", type=int, help=f"public tokens read after the calibration tokens ({d.tokens})")
    g.add_argument("--fit-epochs", type=int, help=f"epochs over them ({d.epochs})")
    g.add_argument("--fit-lr", type=float, help=f"AdamW learning rate, cosine decay ({d.lr:g})")
    g.add_argument("--fit-batch-size", type=int,
                   help=f"windows of {d.seq_len} tokens a training step, in the block fit and the KL phase "
                        f"({d.batch_size})")
    g.add_argument("--fit-kl-epochs", type=int,
                   help="then train the fitted blocks end to end for N epochs: KL(full || "
                        f"emulator) of the next-token distributions, the full model's read from cached states "
                        f"({d.kl_epochs}; 0: the block fit alone)")
    g.add_argument("--fit-kl-lr", type=float,
                   help=f"its learning rate ({KL_LR[False]:g} for all weights, {KL_LR[True]:g} with --fit-kl-rank)")
    g.add_argument("--fit-kl-tokens", type=int,
                   help=f"public tokens the KL phase reads, the block fit's first ({d.kl_tokens}: --fit-tokens)")
    g.add_argument("--fit-kl-rank", type=int,
                   help="train a rank-R update of each matrix (and the norms, biases) in the KL phase: the optimiser "
                        f"holds R x (rows + cols) per matrix, not rows x cols ({d.kl_rank}; 0: all weights)")
    g.add_argument("--fit-kl-interface", type=float,
                   help="the KL phase also pulls the emulator's output (the top adapter's input) toward the full "
                        "model's, weighing its relative error by W: the top adapter's gradients then stay the full "
                        f"model's (holds one more hidden state per KL token; {d.kl_interface:g}: KL alone)")
    g.add_argument("--fit-kl-perturb", type=float,
                   help="the KL phase also trains each batch through a bottom adapter with noise of S x rms on its "
                        "matrices, against the full model with the same: the emulator learns to answer a change of "
                        "the bottom adapter's output as the full middle does (twice the KL steps, one more teacher "
                        f"pass; {d.kl_perturb:g}: off)")
    g.add_argument("--fit-precision", choices=PRECISIONS,
                   help="training steps under bf16 autocast or in fp32 (auto: bf16 on a GPU that multiplies bf16 "
                        "natively, fp32 elsewhere - on a CPU always, where bf16's casts cost the owner's memory "
                        f"target; here: {d.precision}; --fit-budget hour: bf16 wherever native)")
    g.add_argument("--fit-text", choices=FIT_TEXTS,
                   help="what the fit reads: the owner's public text (--calib-data), or self: text the full model "
                        "samples itself, held whole while it samples - closer on text unlike the public "
                        f"text's domain ({d.text})")
    g.add_argument("--fit-align", action="store_true", default=None,
                   help="the KL phase trains the adapter blocks too, so the data owner starts from blocks that make "
                        "the emulator behave like the model; plugin --bundle takes that shift out again")


def fit_settings_from_args(args: argparse.Namespace):
    """FitSettings from the flags of add_fit_arguments: the budget's, with each flag given over it (a bad value: one
    line, before anything runs)."""
    from offsite_ds.fitting import budget_settings

    return budget_settings(args.fit_budget, tokens=args.fit_tokens, epochs=args.fit_epochs, lr=args.fit_lr,
                           batch_size=args.fit_batch_size, kl_epochs=args.fit_kl_epochs, kl_lr=args.fit_kl_lr,
                           kl_tokens=args.fit_kl_tokens, kl_rank=args.fit_kl_rank, align=args.fit_align,
                           precision=args.fit_precision, text=args.fit_text, kl_interface=args.fit_kl_interface,
                           kl_perturb=args.fit_kl_perturb)


def fit_flags_given(args: argparse.Namespace) -> list[str]:
    """The --fit-* flags that set the fit away from the defaults: where nothing is fitted they would change
    nothing, so the commands refuse them in one line instead of ignoring them."""
    from dataclasses import fields

    from offsite_ds.fitting import FitSettings, budget_settings

    given = fit_settings_from_args(args)
    budget = budget_settings(args.fit_budget)
    base = budget_settings(args.fit_budget, kl_rank=args.fit_kl_rank)  # the KL lr's default follows the rank given
    flags = [f"--fit-{f.name.replace('_', '-')}" for f in fields(FitSettings)
             if getattr(given, f.name) != getattr(base, f.name)]  # fields without a flag keep their default
    flags += ["--fit-kl-rank"] if given.kl_rank != budget.kl_rank else []
    return (["--fit-budget"] if args.fit_budget != "default" else []) + flags
