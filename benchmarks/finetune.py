#!/usr/bin/env python
"""The efficiency benchmark as a script: the same thing as `offsite-ds bench` (same options).

    python benchmarks/finetune.py --model opt-1.3b --settings ft,ft-lora,ot,ot-lora,ot-lora-kernels \\
        --layout 2-8-2 --batch-size 1 --seq-len 512
    python benchmarks/finetune.py --smoke          # tiny shapes on CPU, seconds
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from offsite_ds.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
