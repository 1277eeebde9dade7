"""Results are data: every folder of benchmarks/results/ holds a run's outputs plus a machine-written
`meta.json`, and the folder index (benchmarks/results/README.md) is generated from those files.

    # after a run, in its results folder: what ran, on what, from which inputs
    python benchmarks/results_index.py meta FOLDER --what "..." --command "..." [--input FILE ...] [--code PATH ...]
    # a folder measured before meta.json existed: what its files record, the rest marked unknown
    python benchmarks/results_index.py backfill FOLDER --what "..." [--device TEXT] [--code PATH ...] [--notes TEXT]
    # the index, from every meta.json
    python benchmarks/results_index.py index

tests/test_results_layout.py fails on code inside results/, a folder without meta.json and a stale index.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: the worktree's offsite_ds

from offsite_ds.atomic import write_json, write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
INDEX = RESULTS / "README.md"
META = "meta.json"
UNKNOWN = "unknown"
FIELDS = ("folder", "date", "what", "commit", "command", "versions", "device", "inputs", "code", "recorded_in",
          "notes")
CODE_SUFFIXES = (".py", ".sh", ".ipynb", ".bash")


def fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def git_output(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def recorded_in(folder: Path) -> str:
    """The oldest commit that added one of the folder's files (when the results entered the repository),
    renames followed file by file."""
    added = []
    if not folder.resolve().is_relative_to(ROOT):
        return "not in the repository"
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META):
        found = git_output("log", "--follow", "--diff-filter=A", "--format=%at %H %ad", "--date=short", "--",
                     str(file.resolve().relative_to(ROOT)))
        if found:
            stamp, rest = found.splitlines()[-1].split(" ", 1)
            added.append((int(stamp), rest))
    return min(added)[1] if added else UNKNOWN


def write_meta(folder: Path, what: str, command: str, inputs: list[str], code: list[str],
               notes: str = "", commit: str | None = None) -> dict:
    """meta.json of a run made now: this checkout's commit (or `commit`, read when the run started: a long run
    may outlive HEAD) and versions, this machine's device."""
    import torch

    from offsite_ds.bench.devices import describe_device
    from offsite_ds.bench.report import versions

    found = versions()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = found.pop("git_commit")
    meta = {"folder": folder.name, "date": folder.name[:10], "what": what, "commit": commit or head or UNKNOWN,
            "command": command, "versions": found, "device": describe_device(device).to_json(),
            "inputs": {name: fingerprint(name) for name in inputs}, "code": code, "recorded_in": recorded_in(folder),
            "notes": notes}
    write_json(folder / META, meta)
    return meta


def backfill_meta(folder: Path, what: str, device: str | None, code: list[str], notes: str = "",
                  command: str | None = None) -> dict:
    """meta.json of an old folder: the commit, command, versions and device its own JSON files record (the
    first file that records each), the commit that added it, and `unknown` for everything not recorded."""
    known: dict = {}
    for file in sorted(folder.rglob("*.json")):
        if file.name == META:
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        versions = data.get("versions") if isinstance(data.get("versions"), dict) else None
        if versions and "commit" not in known and versions.get("git_commit"):
            known["commit"] = versions["git_commit"]
        for key, value in (("command", data.get("command")), ("versions", versions),
                           ("device", data.get("device") or data.get("machine"))):
            if value and key not in known:
                known[key] = value
    meta = {"folder": folder.name, "date": folder.name[:10], "what": what,
            "commit": known.get("commit", UNKNOWN), "command": known.get("command", command or UNKNOWN),
            "versions": {k: v for k, v in known["versions"].items() if k != "git_commit"}
            if "versions" in known else UNKNOWN,
            "device": known.get("device", device or UNKNOWN), "inputs": UNKNOWN, "code": code,
            "recorded_in": recorded_in(folder), "notes": notes or "written after the run from what its files "
            "record; the folder's README.md describes the run"}
    write_json(folder / META, meta)
    return meta


def folders(root: Path = RESULTS) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _device_text(device) -> str:
    if isinstance(device, dict):
        return " ".join(str(device[k]) for k in ("type", "name") if device.get(k))
    return str(device)


def index_text(root: Path = RESULTS) -> str:
    """The index README: one row per folder, from its meta.json (the folder's README is its first link)."""
    lines = ["# Benchmark and study results", "",
             "Generated by `python benchmarks/results_index.py index` from each folder's `meta.json` (do not edit",
             "by hand). Each folder holds one run's outputs only; the code that made them lives in `benchmarks/`,",
             "`experiments/` or the toolkit (the `code` column). How the efficiency figures are measured, and how",
             "to reproduce them: [benchmarks/README.md](../README.md).", "",
             "| folder | date | device | what it shows | commit | code |", "| --- | --- | --- | --- | --- | --- |"]
    for folder in folders(root):
        if not (folder / META).is_file():  # listed, so that the gap shows (the layout test fails on it)
            lines.append(f"| {folder.name} | {folder.name[:10]} | {UNKNOWN} | no meta.json yet | {UNKNOWN} | - |")
            continue
        meta = json.loads((folder / META).read_text())
        readme = next((n for n in ("README.md", "results.md") if (folder / n).is_file()), None)
        name = f"[{folder.name}]({folder.name}/{readme})" if readme else folder.name
        commit = meta["commit"] if meta["commit"] == UNKNOWN else f"`{meta['commit'][:12]}`"
        code = ", ".join(f"`{c}`" for c in meta["code"]) or "-"
        cells = [name, meta["date"], _device_text(meta["device"]), meta["what"], commit, code]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    meta = sub.add_parser("meta", help="write FOLDER/meta.json for a run made now")
    back = sub.add_parser("backfill", help="write FOLDER/meta.json for an old run, unknowns marked")
    for q in (meta, back):
        q.add_argument("folder")
        q.add_argument("--what", required=True, help="one line: what the run shows")
        q.add_argument("--code", nargs="*", default=[], help="the scripts or commands' modules that made it")
        q.add_argument("--notes", default="")
    meta.add_argument("--command", required=True)
    meta.add_argument("--input", nargs="*", default=[], help="input files or folders to fingerprint")
    meta.add_argument("--commit", default=None, help="the commit the run started from (default: HEAD now)")
    back.add_argument("--device", default=None, help="the device as the run's README states it")
    back.add_argument("--command", default=None, help="the exact command as the run's README states it")
    sub.add_parser("index", help="rewrite benchmarks/results/README.md")
    args = p.parse_args(argv)
    if args.action == "meta":
        write_meta(Path(args.folder).resolve(), args.what, args.command, args.input, args.code, args.notes,
                   args.commit)
    elif args.action == "backfill":
        backfill_meta(Path(args.folder).resolve(), args.what, args.device, args.code, args.notes, args.command)
    write_text(INDEX, index_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
