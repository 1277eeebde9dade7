"""`offsite-ds compare-emulators [--model M] --calib-data PUBLIC [--train T --valid V --test X] --out DIR`.

Without --model/--train/--valid/--test: SmolLM2-135M and Penn Treebank, as the demo.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from offsite_ds.calibrate import IMPORTANCE_METRICS
    from offsite_ds.cli.train_args import add_distill_loss_arguments, add_fit_arguments
    from offsite_ds.compare import CompareSettings
    from offsite_ds.manifests import MODES
    from offsite_ds.runtime import PRECISIONS

    d = CompareSettings()
    p.add_argument("--model", default=None, help="the owner's full model directory (default: SmolLM2-135M)")
    p.add_argument("--calib-data", default=None,
                   help="the owner's PUBLIC corpus for calibration and distillation (default: the Wikipedia sample "
                        "the demo assets provide); never the data owner's")
    p.add_argument("--train", default=None, help="data owner's training text (default: PTB train)")
    p.add_argument("--valid", default=None, help="data owner's validation text: picks the best adapter (PTB valid)")
    p.add_argument("--test", default=None, help="data owner's test text: the reported column (PTB test)")
    p.add_argument("--out", required=True, help="output folder: per-builder artifacts, compare.md/.json/.png")
    p.add_argument("--layout", default=d.layout,
                   help=f"L-K-R for every builder ({d.layout}); several, comma-separated (e.g. 2-8-2,2-10-2,3-8-3), "
                        "give the privacy/utility frontier (frontier.png) with one ceiling per adapter size")
    p.add_argument("--mlp-width", type=float, default=d.mlp_width, metavar="F",
                   help="every builder's kept middle blocks keep this fraction of their MLP channels, as emulate "
                        "--mlp-width (default: whole blocks; the ceiling always runs whole blocks)")
    p.add_argument("--builders", default=",".join(d.builders),
                   help="comma-separated SELECT[+share][+fit][+distill], SELECT in uniform|importance|crash|iterative "
                        f"({','.join(d.builders)})")
    p.add_argument("--mode", default=d.mode, choices=MODES)
    p.add_argument("--steps", type=int, default=d.steps, help=f"data owner's tuning steps ({d.steps})")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="score the first N tokens (0: all)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    p.add_argument("--importance", default=d.importance, choices=IMPORTANCE_METRICS)
    p.add_argument("--distill-steps", type=int, default=d.distill_steps, help="steps of +distill builders")
    p.add_argument("--distill-lr", type=float, default=d.distill_lr)
    add_distill_loss_arguments(p)  # of the +distill builders
    add_fit_arguments(p, "the +fit builders")
    p.add_argument("--no-ceiling", action="store_true", help="skip the ceiling row (whole middle kept)")
    p.add_argument("--ft", action="store_true", help="add the FT row: full fine-tuning on the same tokens")
    p.add_argument("--ft-lr", type=float, default=d.ft_lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="the training steps of the data owner, the ceiling, FT and +distill (auto: bf16 where the CPU "
                        f"multiplies bf16 natively; here: {d.precision})")
    p.add_argument("--cache-dir", default=None, help="where the demo's model and corpora are cached")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from offsite_ds.cli.train_args import distill_loss_from_args, fit_flags_given, fit_settings_from_args
    from offsite_ds.compare import CompareSettings, best_builder, compare_emulators, parse_builder
    from offsite_ds.errors import OffsiteError

    builders = tuple(b.strip() for b in args.builders.split(",") if b.strip())
    unused = [] if any(parse_builder(b)[2] for b in builders) else fit_flags_given(args)
    if unused:  # flags that would otherwise change nothing
        raise OffsiteError(f"{' '.join(unused)} set how the +fit builders fit: add one to --builders "
                           "(e.g. importance+fit)")

    files = {split: getattr(args, split) for split in ("train", "valid", "test")}
    if any(files.values()) and not all(files.values()):
        raise OffsiteError("pass all of --train, --valid and --test, or none of them (Penn Treebank)")
    if not all(files.values()):
        from offsite_ds.demo_assets import penn_treebank_file

        files = {split: penn_treebank_file(split, args.cache_dir) for split in files}
    model = args.model
    if model is None:
        from offsite_ds.demo_assets import smollm2_dir

        model = smollm2_dir(args.cache_dir)
    calib = args.calib_data
    if calib is None:
        try:
            from offsite_ds.demo_assets import wikipedia_file
        except ImportError:
            raise OffsiteError("no public corpus available here: pass --calib-data FILE (the owner's public text)")
        calib = wikipedia_file("train", args.cache_dir)
    settings = CompareSettings(
        layout=args.layout.split(",")[0].strip(),
        layouts=tuple(x.strip() for x in args.layout.split(",") if x.strip()) if "," in args.layout else (),
        builders=builders, mlp_width=args.mlp_width, mode=args.mode,
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
        eval_seq_len=args.eval_seq_len, eval_tokens=args.eval_tokens or None, eval_every=args.eval_every,
        seed=args.seed, calib_tokens=args.calib_tokens, importance=args.importance,
        distill_steps=args.distill_steps, distill_lr=args.distill_lr,
        distill=distill_loss_from_args(args),
        fit=fit_settings_from_args(args), fit_budget=args.fit_budget, ceiling=not args.no_ceiling, ft=args.ft,
        ft_lr=args.ft_lr,
        progress=not args.no_progress, precision=args.precision)
    report = compare_emulators(model, calib, files["train"], {"valid": files["valid"], "test": files["test"]},
                               args.out, settings)
    print(report["markdown"])
    print(f"\nbest plug-in on valid: {best_builder(report, 'valid')}; table in {args.out}/compare.md, "
          f"compare.json, compare.png")
    return 0
