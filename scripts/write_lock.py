"""Write the lock (constraints.txt) from the running environment: every installed distribution pinned with
==, offsite-ds itself left out, torch pinned without its local label (+cpu) so the CPU wheel on disk matches.

Run by scripts/update_lock.sh after the suite passed in a fresh virtual environment.
"""
from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

HEADER = """\
# The lock: every package the suite passed with, pinned. scripts/test.sh, scripts/demo.sh and CI install
# with `-c constraints.txt`; scripts/update_lock.sh re-resolves to the newest releases, runs the suite in a
# new virtual environment and rewrites this file only if it passes (an upgrade is a tested change).
# torch is the CPU build that lies on disk (2.13.0, no local label so `+cpu` matches).
# Written by scripts/write_lock.py on Python {python} ({machine}).
"""
SKIP = {"offsite-ds", "offsite_ds", "pip", "setuptools", "wheel"}


def lock_lines() -> list[str]:
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name is None or name.lower().replace("_", "-") in SKIP:
            continue
        pins[name.lower().replace("_", "-")] = dist.version.split("+")[0]
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def main(path: str) -> None:
    text = HEADER.format(python=platform.python_version(), machine=platform.machine()) + "\n".join(lock_lines())
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    print(f"{path}: {len(lock_lines())} pins")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt")
