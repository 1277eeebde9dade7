"""Bounded, escape-proof reading of an untrusted artifact directory, and a safetensors header check.

An artifact can make its receiver read only its listed files: inside the directory, regular files,
one link each (a hard link could alias a file outside), opened without following symlinks. The
safetensors header is parsed and bounds-checked here, before safetensors or torch touches the file,
so a hostile header cannot make them allocate or seek beyond the file. All work is linear in the
size of the listed files.
"""
from __future__ import annotations

import hashlib
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from offsite_ds.errors import ArtifactError
from offsite_ds.formats import MAX_HEADER_BYTES, SAFETENSORS_ITEM_BYTES
from offsite_ds.manifests import MANIFEST, check_relpath, decode_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle protocols, torch zip
MAX_WALK_ENTRIES = 1 << 14


def _lstat_regular(directory: Path, rel: str) -> os.stat_result:
    """lstat a listed file and every directory on its way: no symlinks, no devices, no extra hard links."""
    try:
        check_relpath(rel)
    except ValueError as exc:
        raise ArtifactError(f"{directory}: {exc}; re-export the artifact")
    path = directory
    parts = rel.split("/")
    for i, part in enumerate(parts):
        path = path / part
        try:
            st = os.lstat(path)
        except OSError:
            raise ArtifactError(f"{directory}: listed file '{rel}' is missing; the artifact is incomplete")
        last = i == len(parts) - 1
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"{directory}: '{'/'.join(parts[:i + 1])}' is a symbolic link; artifacts must "
                                "hold plain files")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise ArtifactError(f"{directory}: '{'/'.join(parts[:i + 1])}' is not a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{directory}: '{rel}' is not a regular file (device, FIFO or directory); refusing it")
    if st.st_nlink != 1:
        raise ArtifactError(f"{directory}: '{rel}' has {st.st_nlink} hard links (it may alias a file outside "
                            "the artifact); copy the artifact and try again")
    return st


def open_listed(directory: Path, rel: str) -> tuple[int, int]:
    """(fd, size) of a listed file, opened without following links and checked to be the file lstat saw."""
    st = _lstat_regular(directory, rel)
    try:
        fd = os.open(directory / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ArtifactError(f"{directory}: cannot open '{rel}' ({exc.strerror}); refusing it")
    now = os.fstat(fd)
    if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev) or not stat.S_ISREG(now.st_mode):
        os.close(fd)
        raise ArtifactError(f"{directory}: '{rel}' changed while it was checked; refusing it")
    return fd, now.st_size


def read_listed(directory: Path, rel: str, max_bytes: int) -> bytes:
    """A whole listed file, refused if larger than max_bytes (JSON and small weight files)."""
    fd, size = open_listed(directory, rel)
    try:
        if size > max_bytes:
            raise ArtifactError(f"{directory}: '{rel}' has {size} bytes, more than the {max_bytes} allowed")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)[:max_bytes]
    finally:
        os.close(fd)


def read_json_listed(directory: Path, rel: str, max_bytes: int):
    return decode_json(read_listed(directory, rel, max_bytes), f"{directory}/{rel}")


def check_file(directory: Path, rel: str, size: int, sha256: str) -> None:
    """Size (before reading) and SHA-256 of one listed file; also refuses pickle content under any name."""
    fd, actual = open_listed(directory, rel)
    try:
        if actual != size:
            raise ArtifactError(f"{directory}: '{rel}' has {actual} bytes but {MANIFEST} says {size}; "
                                "the file was altered or truncated")
        h = hashlib.sha256()
        with os.fdopen(fd, "rb", closefd=False) as f:
            head = f.read(8)
            h.update(head)
            if _is_pickle(head, actual):
                raise ArtifactError(f"{directory}: '{rel}' holds pickle data; only safetensors and JSON are accepted")
            while block := f.read(1 << 22):
                h.update(block)
    finally:
        os.close(fd)
    if h.hexdigest() != sha256:
        raise ArtifactError(f"{directory}: checksum mismatch for '{rel}'; the file was altered or corrupted")


def _is_pickle(head: bytes, size: int) -> bool:
    """Pickle or torch-zip magic, unless the bytes are a plausible safetensors header length (which can
    begin with the same two bytes: a 640-byte header is b'\\x80\\x02...')."""
    plausible_header = len(head) == 8 and 8 + struct.unpack("<Q", head)[0] <= size
    return head.startswith(PICKLE_MAGIC) and not plausible_header


def check_tree(directory: Path, listed: set[str]) -> None:
    """Nothing in the directory but the manifest, the listed files and their folders; no links, no pickle."""
    seen = 0
    stack = [(directory, "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_WALK_ENTRIES:
                    raise ArtifactError(f"{directory}: more than {MAX_WALK_ENTRIES} entries; refusing it")
                rel = prefix + entry.name
                if entry.is_symlink():
                    raise ArtifactError(f"{directory}: '{rel}' is a symbolic link; artifacts must hold plain files")
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rel + "/"))
                    continue
                if rel.endswith(PICKLE_SUFFIXES):
                    raise ArtifactError(f"{directory}: '{rel}' is a pickle-format file; only safetensors and JSON "
                                        "are accepted")
                if rel != MANIFEST and rel not in listed:
                    raise ArtifactError(f"{directory}: '{rel}' is not listed in {MANIFEST}; re-export the artifact")


# ------------------------------------------------------------------------------------------ safetensors

@dataclass(frozen=True)
class TensorSpan:
    dtype: str  # safetensors name, e.g. F32
    shape: tuple[int, ...]
    start: int
    end: int


def safetensors_header(directory: Path, rel: str) -> dict[str, TensorSpan]:
    """Parse and bounds-check a safetensors header: its length, JSON, dtypes, shapes x dtype size == byte
    span, spans inside the file, in order, without gap or overlap (what the format requires)."""
    where = f"{directory}/{rel}"
    fd, size = open_listed(directory, rel)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            head = f.read(8)
            if len(head) < 8:
                raise ArtifactError(f"{where} is too short to be a safetensors file; re-export it")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise ArtifactError(f"{where}: safetensors header length {n} does not fit the file's {size} bytes")
            raw = f.read(n)
    finally:
        os.close(fd)
    return parse_safetensors_header(raw, size - 8 - n, where)


def parse_safetensors_header(raw: bytes, data_len: int, where: str) -> dict[str, TensorSpan]:
    """The checks of `safetensors_header` on a header already read (`data_len`: bytes after it); shared
    with the owner's own checkpoints (shards.py), which are read without the artifact's file rules."""
    header = decode_json(raw, f"{where} (safetensors header)")
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ArtifactError(f"{where}: safetensors __metadata__ must map strings to strings")
    spans = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} has a malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_ITEM_BYTES:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} has unknown dtype {str(dtype)[:20]!r}")
        ints = lambda xs: isinstance(xs, list) and all(type(x) is int and 0 <= x < 1 << 48 for x in xs)
        if not ints(shape) or len(shape) > 8 or not ints(offsets) or len(offsets) != 2:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} has a malformed shape or offsets")
        start, end = offsets
        if not start <= end <= data_len:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} lies outside the file (offsets {start}..{end}, "
                                f"data is {data_len} bytes)")
        if math.prod(shape) * SAFETENSORS_ITEM_BYTES[dtype] != end - start:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} has shape {shape} {dtype} but spans {end - start} "
                                "bytes")
        spans[name] = TensorSpan(dtype, tuple(shape), start, end)
    position = 0
    for name, span in sorted(spans.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if span.start != position:
            raise ArtifactError(f"{where}: tensor {name[:80]!r} {'overlaps another' if span.start < position else 'leaves a gap'}"
                                " in the data; the header is corrupt")
        position = span.end
    if position != data_len:
        raise ArtifactError(f"{where}: the tensors cover {position} of the file's {data_len} data bytes")
    return spans
