"""Atomic writes: a file or a whole artifact directory appears complete or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def utc_stamp(when: time.struct_time | None = None) -> str:
    """The one timestamp format artifacts and results record (ISO 8601, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", when or time.gmtime())


def write_with(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temp file in the same folder, then rename it over `path`: the file appears complete or not
    at all, and a failed write leaves no temp file behind. The one way every file here is written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically (see write_with)."""
    write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (see write_text)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def cached(out: str | Path, make) -> dict:
    """Resume: a finished step's OUT/result.json is kept and reused; otherwise `make()` runs and its result is
    stored atomically."""
    path = Path(out) / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    result = make()
    write_json(path, result)
    return result


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically (see write_with); a pyplot figure is closed (no leak)."""
    import sys

    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(fig)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir` in one rename.

    An existing `out_dir` is moved aside first and deleted only after the new one is in place, so a
    crash at any point leaves either the old or the new directory, never a half-written one.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(out)
    if out.exists() and not out.is_dir():
        from offsite_ds.errors import OffsiteError

        raise OffsiteError(f"{out} exists and is not a directory; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
