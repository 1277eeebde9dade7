"""`offsite-ds probe-lr MODEL BUNDLE [--public builtin:wikipedia | FILE --heldout FILE] [--lrs ...] [--tolerance X]`."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from offsite_ds.emulator import PUBLIC_CORPUS, PUBLIC_SAMPLE
    from offsite_ds.lr_probe import ProbeSettings
    from offsite_ds.manifests import MODES

    d = ProbeSettings()
    p.add_argument("model", help="the owner's full model directory")
    p.add_argument("bundle", help="the EmulatorBundle to advise on (its offsite.json gets the probed lr)")
    p.add_argument("--public", default=PUBLIC_CORPUS,
                   help=f"the owner's PUBLIC text to tune on (default {PUBLIC_CORPUS}, the measured setting: pip "
                        f"install --no-deps gensim==4.4.0; {PUBLIC_SAMPLE}, shipped with offsite-ds; or a file, "
                        f"with --heldout)")
    p.add_argument("--heldout", default=None, help="public held-out text the plug-ins are scored on "
                                                   "(default: the builtin text's held-out split)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(d.lrs), help="learning rates to probe")
    p.add_argument("--tolerance", type=float, default=d.tolerance,
                   help=f"advise the largest lr whose plug-in stays within this multiple of the full model's "
                        f"perplexity on the held-out public text ({d.tolerance:g})")
    p.add_argument("--mode", default=d.mode, choices=MODES, help="what the data owner will train (advice is per mode)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"tuning steps per lr ({d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens each plug-in is scored on")
    p.add_argument("--work", default=None, help="keep each lr's result here (resume); default BUNDLE.lr-probe, "
                                                "removed when done")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from offsite_ds.lr_probe import ProbeSettings, probe_lr

    settings = ProbeSettings(lrs=tuple(args.lrs), mode=args.mode, steps=args.steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, eval_tokens=args.eval_tokens, tolerance=args.tolerance)
    advice = probe_lr(args.model, args.bundle, args.public, args.heldout, settings, work_dir=args.work,
                      progress=not args.no_progress)
    points = ", ".join(f"{p['lr']:g}: {p['plugin_ppl']:.2f}" for p in advice["points"])
    print(f"lr advice for {args.bundle}: {advice['lr']:g} ({args.mode}); plug-in perplexity on the public held-out "
          f"text by lr: {points}; full model {advice['full_ppl']:.2f}")
    return 0
