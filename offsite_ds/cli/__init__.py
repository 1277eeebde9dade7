"""`offsite-ds <command>`: a thin layer over the Python API.

Each command lives in its own module under offsite_ds/cli/ with `HELP`, `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs, so `--help` stays fast.
Errors a user can fix (OffsiteError, missing files) print as one line and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> (module under offsite_ds.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "emulate": ("emulate", "model owner: split a model and build an EmulatorBundle"),
    "probe-lr": ("probe_lr", "model owner: find the data owner's lr that transfers through a bundle, record it"),
    "tune": ("tune", "data owner: tune the adapter through the emulator -> AdapterPackage"),
    "plugin": ("plugin", "model owner: validate an AdapterPackage and plug it into the full model"),
    "eval": ("evaluate", "perplexity (and lm-eval tasks) of one model directory"),
    "report": ("report", "the paper's rows for one round trip: zero-shot, emulator, plug-in"),
    "demo": ("demo", "the whole round trip on SmolLM2-135M and Penn Treebank, offline, on CPU"),
    "distill": ("distill", "model owner: distil the emulator's middle against the full middle (ZeRO-3)"),
    "finetune": ("finetune", "model owner: full fine-tuning baseline, FT or FT+LoRA (ZeRO-3)"),
    "plan": ("plan", "per-GPU memory estimates for each role before launching"),
    "bench": ("bench", "throughput / memory / MFU of FT, FT+LoRA, OT, OT+LoRA, OT+kernels"),
    "eval-table": ("eval_table", "the paper's five-row lm-eval table for a round trip"),
    "compare-emulators": ("compare", "owner: build each emulator, tune the same adapter through each, one table"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(f"offsite_ds.cli.{module_name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offsite-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            try:
                _load(name).add_arguments(p)
            except ModuleNotFoundError as exc:  # a command whose module is not built yet
                if not exc.name or not exc.name.startswith("offsite_ds.cli"):
                    raise
    return parser


def _take_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher prepends --local_rank=N; move it to LOCAL_RANK where every rank looks."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from offsite_ds.errors import OffsiteError

    argv = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_load(args.command).run(args) or 0)
    except OffsiteError as exc:
        one_line = " ".join(str(exc).splitlines())  # names from an untrusted artifact may hold line breaks
        print(f"offsite-ds {args.command}: error: {one_line}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"offsite-ds {args.command}: error: {exc.filename or exc}: no such file or directory",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"offsite-ds {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
