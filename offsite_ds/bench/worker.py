"""`python -m offsite_ds.bench.worker CASE.json RESULT.json`: one benchmark case in a fresh process.

The suite starts one of these per case on CUDA, so that nothing (an OOM, a kernel patch, a DeepSpeed
engine, the allocator's cache) carries over from one setting's measurement to the next.
"""
from __future__ import annotations

import json
import sys

from offsite_ds.atomic import write_json


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m offsite_ds.bench.worker CASE.json RESULT.json", file=sys.stderr)
        return 2
    from offsite_ds.bench.runner import run_case_inline

    case = json.loads(open(argv[0]).read())
    write_json(argv[1], run_case_inline(case))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
