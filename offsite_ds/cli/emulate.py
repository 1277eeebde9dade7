"""`offsite-ds emulate MODEL --layout L-K-R --out BUNDLE [--select importance|uniform|crash [--share]] [--calib-data PUBLIC | --no-calib] [--no-fit]`."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from offsite_ds.calibrate import DEFAULT_CALIB_TOKENS, IMPORTANCE_METRICS
    from offsite_ds.cli.train_args import add_fit_arguments
    from offsite_ds.emulator import DEFAULT_SELECT, GUARD_RATIO, PUBLIC_CORPUS, PUBLIC_SAMPLE
    from offsite_ds.formats import WEIGHT_DTYPE_NAMES
    from offsite_ds.manifests import METHODS
    from offsite_ds.sandwich import SELECTIONS

    p.add_argument("model", help="local Hugging Face model directory (the owner's full model)")
    p.add_argument("--layout", required=True, help="L-K-R, e.g. 2-8-2 (or L-*-R with --keep-ratio or --max-ratio)")
    p.add_argument("--keep-ratio", type=float, default=None, help="keep this fraction of the middle instead of K")
    p.add_argument("--out", required=True, help="EmulatorBundle directory to write")
    p.add_argument("--select", default=DEFAULT_SELECT, choices=SELECTIONS,
                   help="which middle blocks to keep: importance (default: the K whose removal hurts most on "
                        "--calib-data), iterative (remove one block at a time, re-scoring the rest: SLEB), "
                        "uniform (the paper's rule), crash (CKA clusters of adjacent blocks, one kept per cluster)")
    p.add_argument("--share", action="store_true",
                   help="--select crash: every dropped position runs its cluster's kept block (original depth, "
                        "K blocks of weights; load it with offsite-ds tools, see the README)")
    p.add_argument("--calib-data", default=PUBLIC_SAMPLE,
                   help=f"the owner's PUBLIC calibration text (never the data owner's): scores blocks for "
                        f"importance/crash and measures the emulator-vs-full perplexity guard (default "
                        f"{PUBLIC_SAMPLE}: public Wikipedia text shipped with offsite-ds; {PUBLIC_CORPUS}: the "
                        f"larger sample, after pip install --no-deps gensim==4.4.0)")
    p.add_argument("--no-calib", dest="calib_data", action="store_const", const=None,
                   help="no calibration text: only --select uniform, no guard, the model is never loaded")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                   help=f"calibration tokens read from --calib-data ({DEFAULT_CALIB_TOKENS})")
    p.add_argument("--importance", default="drop", choices=IMPORTANCE_METRICS,
                   help="--select importance: perplexity rise with the block dropped (drop) or 1 - cos(in, out)")
    p.add_argument("--guard-ratio", type=float, default=GUARD_RATIO,
                   help=f"refuse an emulator whose perplexity on --calib-data exceeds this multiple of the full "
                        f"model's ({GUARD_RATIO:g}): an adapter tuned through it may not transfer")
    p.add_argument("--allow-far", action="store_true",
                   help="write an emulator beyond --guard-ratio anyway (with a warning), e.g. to measure it")
    p.add_argument("--max-ratio", type=float, default=None,
                   help="fidelity target: K becomes the fewest kept blocks (at most the layout's; L-*-R: any) "
                        "whose emulator/full perplexity on --calib-data stays within this ratio")
    p.add_argument("--fit", action=argparse.BooleanOptionalAction, default=None,
                   help="train each kept middle block to stand in for the run of blocks it replaces, on the public "
                        "text after the calibration tokens (one teacher pass, then per-block epochs, then end to "
                        "end). Default: on wherever it can run (calibration text, --method drop, no --share); "
                        "--no-fit: the selection alone")
    add_fit_arguments(p, "--fit")
    p.add_argument("--mlp-width", type=float, default=None,
                   help="fraction F of MLP channels each kept middle block keeps, the best scored on --calib-data "
                        "(width as well as depth: 2-12-2 at 0.54 holds about 2-8-2's weights); stored zero-padded")
    p.add_argument("--text-field", default="text", help="field holding the text in .json/.jsonl/.parquet data")
    p.add_argument("--method", default="drop", choices=METHODS,
                   help="compression of the middle: uniform layer-drop (paper), or the ablation's prune/quantize")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="--method prune: fraction of weights zeroed")
    p.add_argument("--bits", type=int, default=8, help="--method quantize: fake-quantisation bits")
    p.add_argument("--dtype", default=None, choices=WEIGHT_DTYPE_NAMES,
                   help="dtype of the bundle's weights (default: the checkpoint's own, e.g. bf16 stays bf16)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the long steps (sampled text, chosen blocks, fitted blocks, training steps) are kept "
                        "while emulate runs, removed once the bundle is written (default: OUT.checkpoints); the "
                        "same command after a stop (crash, Ctrl-C, SIGTERM, the guard) goes on from there")
    p.add_argument("--save-every-s", type=float, default=600.0,
                   help="seconds between checkpoints of the training steps (600; each block and phase is kept "
                        "when it ends, and SIGTERM saves at the next step)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from offsite_ds.cli.train_args import fit_flags_given, fit_settings_from_args
    from offsite_ds.emulator import AUTO_FIT, make_bundle
    from offsite_ds.errors import OffsiteError
    from offsite_ds.runtime import return_freed_memory

    return_freed_memory()  # the owner's streamed passes free block-sized buffers all the time

    given = fit_flags_given(args)
    if given and args.fit is False:  # flags that would otherwise change nothing
        raise OffsiteError(f"{' '.join(given)} set how the kept blocks are fitted: drop --no-fit")
    # a --fit-* flag asks for the fit as --fit does (refused where it cannot run); neither: the default, AUTO_FIT
    fit = None if args.fit is False else fit_settings_from_args(args) if args.fit or given else AUTO_FIT
    written = make_bundle(args.model, args.layout, args.out, keep_ratio=args.keep_ratio, method=args.method,
                          prune_ratio=args.prune_ratio, quant_bits=args.bits, select=args.select, share=args.share,
                          calib_data=args.calib_data, calib_tokens=args.calib_tokens, importance=args.importance,
                          text_field=args.text_field, guard_ratio=args.guard_ratio, progress=not args.no_progress,
                          dtype=args.dtype, max_ratio=args.max_ratio, allow_far=args.allow_far,
                          fit=fit, checkpoint_dir=args.checkpoint_dir, save_every_s=args.save_every_s,
                          mlp_width=args.mlp_width)
    manifest = written.manifest
    shared = f", shared over {len(manifest.share_map)} positions" if manifest.share_map is not None else ""
    print(f"emulator bundle {written.path}: layout {manifest.layout} of {manifest.base_depth} blocks ({args.select}"
          f"{shared}), blocks kept {manifest.block_map}, fingerprint {manifest.fingerprint[:12]}")
    if manifest.quality is not None:
        q = manifest.quality
        print(f"zero-shot perplexity on {q.tokens} calibration tokens: emulator {q.emulator_ppl:.2f}, "
              f"full {q.full_ppl:.2f} (ratio {q.ratio:.2f})")
    record = manifest.compression.fit
    if record is not None:
        kl = ""
        if record.kl is not None:
            kl = f", KL to the full model {record.kl.before:.3f} -> {record.kl.after:.3f}"
            if record.kl.held_out_tokens is not None:
                kl += f" on {record.kl.held_out_tokens} held-out tokens"
            if record.kl.reverted:
                kl += " (the KL phase's change dropped)"
        print(f"kept blocks fitted on {record.tokens} tokens of {record.text} text{kl} (--no-fit: the selection alone)")
    return 0
