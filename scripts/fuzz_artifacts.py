"""Fuzz the artifact validators: mutate valid EmulatorBundles and AdapterPackages, run the real CLI on each.

    python scripts/fuzz_artifacts.py --cases 2000 [--seed 0] [--workdir DIR]

Seeds are tiny OPT and Llama round trips (bundles; full, LoRA and Houlsby-adapter packages). Each case
copies one seed, applies a hypothesis-drawn mutation (manifest fields, safetensors headers, tensor
values, file sets, config/tokenizer JSON), and runs `offsite-ds plugin` (packages) or `offsite-ds eval`
(bundles) in a forked child with RLIMIT_AS set and an audit hook that fails the case if any file of a
"secret" directory beside the artifact is opened. A case passes when the child exits 0 with a correct
result, or 2 with one error line as the last line on stderr - never a traceback, never a read of the
secret, never past the memory limit. tests/test_fuzz_artifacts.py runs a few hundred cases in CI.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

for _k, _v in {"TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

MEMORY_BUDGET = 1 << 30  # address space a case may add to the forked child's
CASE_TIMEOUT_S = 60
SECRET = "secret"
TEXT = "the quick brown fox jumps over the lazy dog . " * 20


@dataclass
class Seed:
    name: str
    kind: str  # "package" or "bundle"
    model: Path
    path: Path


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str
    problem: str | None = None  # why the case failed the contract, None when it held
    mutation: str = ""


# ------------------------------------------------------------------------------------------------ seeds

def build_seeds(root: Path) -> list[Seed]:
    """Tiny OPT and Llama models, their bundles, and packages of three modes (one training step each)."""
    from offsite_ds.emulator import make_bundle
    from offsite_ds.roles.tune_adapter import tune
    from offsite_ds.tiny import save_tiny_model
    from offsite_ds.train import TrainConfig

    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    seeds = []
    for family, modes in (("opt", ("full", "lora")), ("llama", ("adapter", "lora"))):
        model = save_tiny_model(family, root / f"model_{family}", n_layers=6)
        bundle = make_bundle(model, "2-1-2", root / f"bundle_{family}", select="uniform", calib_data=None).path
        seeds.append(Seed(f"{family}-bundle", "bundle", model, bundle))
        for mode in modes:
            out = root / f"package_{family}_{mode}"
            tune(bundle, corpus, out, mode=mode, cfg=TrainConfig(steps=1, batch_size=2, progress=False,
                                                                  checkpoint_dir=str(root / f"ckpt_{family}_{mode}")),
                 seq_len=16)
            seeds.append(Seed(f"{family}-{mode}", "package", model, out))
    (root / "data.txt").write_text(TEXT)
    return seeds


# ---------------------------------------------------------------------------------------------- helpers

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(path: Path) -> dict:
    return json.loads((path / "offsite.json").read_text())


def save(path: Path, manifest: dict) -> None:
    (path / "offsite.json").write_text(json.dumps(manifest))


def relist(path: Path, manifest: dict | None = None) -> None:
    """Make the manifest agree with the files again (sizes, hashes, bundle fingerprint): reaches deeper checks."""
    from offsite_ds.fingerprints import files_fingerprint

    manifest = manifest if manifest is not None else load(path)
    files = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if rel != "offsite.json" and (p.is_file() and not p.is_symlink()):
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha(p)}
    manifest["files"] = files
    if "fingerprint" in manifest:
        manifest["fingerprint"] = files_fingerprint(files)
    save(path, manifest)


def weight_file(path: Path) -> str:
    return "adapter.safetensors" if (path / "adapter.safetensors").exists() else "model.safetensors"


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# -------------------------------------------------------------------------------------------- mutations

def json_values(st):
    """Hostile JSON values: wrong types, bools, huge and non-finite numbers, unicode, nesting."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                        st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, 10 ** 30, 10 ** 300]),
                        st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([float("nan"), float("inf"), -0.0, 5e-324, 1e308]),
                        st.text(max_size=20), st.sampled_from(["", "abc", "../../x", "/etc/hostname", "~", "\x00",
                                                               "é" * 10, "\u202e", "lora", "q_proj"]))
    return st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                          st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                        max_leaves=6)


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree (dict keys and list indices)."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _parent(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    return obj


def mutate_field(d, st, path: Path, ctx) -> str:
    manifest = load(path)
    paths = [p for p, _ in _paths(manifest) if p]
    target = d.draw(st.sampled_from(paths))
    action = d.draw(st.sampled_from(["set", "delete", "extra"]))
    parent = _parent(manifest, target)
    if action == "set":
        parent[target[-1]] = d.draw(json_values(st))
    elif action == "delete":
        if isinstance(parent, dict):
            del parent[target[-1]]
        else:
            parent.pop(target[-1])
    else:
        holder = parent if isinstance(parent, dict) else manifest
        holder[d.draw(st.text(min_size=1, max_size=10))] = d.draw(json_values(st))
    save(path, manifest)
    return f"manifest {action} {'.'.join(map(str, target))[:60]}"


def mutate_number(d, st, path: Path, ctx) -> str:
    """Edge values in the fields that size allocations or index blocks."""
    manifest = load(path)
    keys = [p for p, v in _paths(manifest) if p and p[-1] in ("r", "alpha", "dropout", "bottleneck", "base_depth",
                                                               "kept", "middle", "bytes") or (len(p) == 2 and p[0] in (
                                                               "block_map", "adapter_positions"))]
    target = d.draw(st.sampled_from(keys))
    value = d.draw(st.sampled_from([0, -1, 1, 2, 3, 5, 31, 32, 33, 64, 2 ** 31, 2 ** 63, 10 ** 400 // 10 ** 390, True,
                                    False, 0.5, 1.0, 1.5, float("nan"), float("inf"), -1e-9, "1", [1], None]))
    _parent(manifest, target)[target[-1]] = value
    save(path, manifest)
    return f"number {'.'.join(map(str, target))}={value!r}"


def mutate_path(d, st, path: Path, ctx) -> str:
    """A listed file renamed to a hostile path, with the true size and SHA-256 of what it points at."""
    manifest = load(path)
    secret = ctx["secret"]
    name = d.draw(st.sampled_from(sorted(manifest["files"])))
    hostile = d.draw(st.sampled_from([str(secret / "hostname"), f"../{SECRET}/hostname", "~/hostname",
                                      f"{name}\x00.json", f"..\\{SECRET}\\hostname", f"./{name}", f"{name}/",
                                      f"a/../{name}", "/etc/hostname", f"{name} ", "..", ".", "", "\uff0e\uff0e/x",
                                      f"//{name}"]))
    entry = manifest["files"].pop(name)
    resolved = (path / hostile) if not hostile.startswith("/") else Path(hostile)
    try:
        if resolved.is_file():
            entry = {"bytes": resolved.stat().st_size, "sha256": sha(resolved)}
    except (OSError, ValueError):
        pass
    manifest["files"][hostile] = entry
    if d.draw(st.booleans()):
        (path / name).unlink()
    save(path, manifest)
    return f"path {name} -> {hostile!r}"


def mutate_header(d, st, path: Path, ctx) -> str:
    """The safetensors header: its length, dtypes, shapes, offsets (overlap, outside), or truncation."""
    rel = weight_file(path)
    data = (path / rel).read_bytes()
    header, body = split_safetensors(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = d.draw(st.sampled_from(names))
    kind = d.draw(st.sampled_from(["length", "dtype", "shape", "offsets", "overlap", "truncate", "append", "garbage",
                                   "drop", "rename", "metadata"]))
    info = header[name]
    if kind == "length":
        n = d.draw(st.sampled_from([0, 1, 7, 2 ** 31, 2 ** 64 - 1, len(data), len(data) - 8]))
        out = struct.pack("<Q", n) + data[8:]
    elif kind == "truncate":
        out = data[:d.draw(st.integers(0, len(data) - 1))]
    elif kind == "append":
        out = data + b"\0" * d.draw(st.integers(1, 64))
    elif kind == "garbage":
        out = data[:8] + os.urandom(d.draw(st.integers(1, 64))) + data[8 + 64:]
    else:
        if kind == "dtype":
            info["dtype"] = d.draw(st.sampled_from(["F16", "I64", "F64", "BOOL", "X9", "", "F8_E4M3", "bf16"]))
        elif kind == "shape":
            info["shape"] = d.draw(st.sampled_from([[], [0], [2 ** 40, 2 ** 40], [-1], [1.5], [True],
                                                    list(reversed(info["shape"])), info["shape"] + [1]]))
        elif kind == "offsets":
            info["data_offsets"] = d.draw(st.sampled_from([[0, 2 ** 62], [len(body), len(body) + 4], [8, 4],
                                                           [-4, 0], [0], [0.0, 4.0]]))
        elif kind == "overlap":
            other = header[d.draw(st.sampled_from(names))]
            info["data_offsets"] = list(other["data_offsets"])
        elif kind == "drop":
            del header[name]
        elif kind == "rename":
            header[name + d.draw(st.sampled_from(["x", ".weight", "\x00"]))] = header.pop(name)
        else:
            header["__metadata__"] = d.draw(st.sampled_from([{"a": 1}, [], "x", {"format": "pt" * 1000}]))
        out = join_safetensors(header, body)
    (path / rel).write_bytes(out)
    if d.draw(st.booleans()):
        relist(path)
    return f"safetensors {kind} {name}"


def mutate_values(d, st, path: Path, ctx) -> str:
    """Tensor values: NaN/Inf refused; denormals and large finite values are a correct package."""
    from safetensors.torch import load_file, save_file

    rel = weight_file(path)
    tensors = load_file(str(path / rel))
    name = d.draw(st.sampled_from(sorted(tensors)))
    value = d.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-45, 1e-40, 3e38, 0.0]))
    t = tensors[name].clone()
    t.view(-1)[d.draw(st.integers(0, max(t.numel() - 1, 0)))] = value
    tensors[name] = t
    save_file(tensors, str(path / rel), metadata={"format": "pt"})
    relist(path)
    return f"value {name}={value} ({'finite' if math.isfinite(value) else 'non-finite'})"


def mutate_files(d, st, path: Path, ctx) -> str:
    """File sets: extra, missing, symlink, hard link, FIFO, pickle under another suffix."""
    import torch

    manifest = load(path)
    name = d.draw(st.sampled_from(sorted(manifest["files"])))
    kind = d.draw(st.sampled_from(["extra", "extra-listed", "missing", "symlink-out", "symlink-in", "hardlink-out",
                                   "fifo", "pickle-as-safetensors", "pickle-bin", "dir-for-file", "subdir-symlink"]))
    secret = ctx["secret"] / "hostname"
    target = path / name
    if kind in ("extra", "extra-listed"):
        (path / d.draw(st.sampled_from(["extra.json", "notes.txt", "model.py", "x.safetensors"]))).write_text("{}")
    elif kind == "missing":
        target.unlink()
    elif kind == "symlink-out":
        target.unlink()
        target.symlink_to(secret)
    elif kind == "symlink-in":
        other = path / d.draw(st.sampled_from(sorted(manifest["files"])))
        target.unlink()
        target.symlink_to(other.name if other != target else "offsite.json")
    elif kind == "hardlink-out":
        target.unlink()
        os.link(secret, target)
    elif kind == "fifo":
        target.unlink()
        os.mkfifo(target)
    elif kind in ("pickle-as-safetensors", "pickle-bin"):
        dest = target if kind == "pickle-as-safetensors" else path / "pytorch_model.bin"
        torch.save({"x": torch.zeros(2)}, dest)
    elif kind == "dir-for-file":
        target.unlink()
        target.mkdir()
    else:
        (path / "sub").symlink_to(ctx["secret"], target_is_directory=True)
    if kind != "extra" and d.draw(st.booleans()) and kind in ("extra-listed", "pickle-as-safetensors", "pickle-bin",
                                                             "hardlink-out"):
        manifest = load(path)
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if rel != "offsite.json" and p.is_file() and not p.is_symlink():
                manifest["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha(p)}
        save(path, manifest)
        if "fingerprint" in manifest:
            relist(path)
    return f"files {kind} {name}"


def mutate_config(d, st, path: Path, ctx) -> str:
    """A bundle's config.json / tokenizer JSON: remote code, file paths, absurd or inconsistent sizes."""
    rel = d.draw(st.sampled_from(["config.json", "tokenizer_config.json", "generation_config.json", "tokenizer.json"]))
    obj = json.loads((path / rel).read_text())
    key = d.draw(st.sampled_from(["auto_map", "num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size",
                                  "model_type", "tokenizer_file", "tokenizer_class", "max_position_embeddings",
                                  "tie_word_embeddings", "num_attention_heads", "model", "trust_remote_code"]))
    obj[key] = d.draw(st.one_of(st.sampled_from([{"AutoModelForCausalLM": "evil.Model"}, 10 ** 6, 2 ** 40, 0, -1, 7,
                                                 64, 48, 1, "gpt_neox", "bloom", str(ctx["secret"] / "hostname"),
                                                 "Evil.Tokenizer", True, None, 3.5]), json_values(st)))
    (path / rel).write_text(json.dumps(obj))
    relist(path)
    return f"{rel} {key}={str(obj[key])[:40]}"


PACKAGE_MUTATIONS = (mutate_field, mutate_number, mutate_path, mutate_header, mutate_values, mutate_files)
BUNDLE_MUTATIONS = PACKAGE_MUTATIONS + (mutate_config,)


# ------------------------------------------------------------------------------------------------ runner

def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run_cli(argv: list[str], workdir: Path, secret: Path, verify=None) -> tuple[int, str, str]:
    """Run `offsite-ds argv` in a forked child with RLIMIT_AS and a secret-read audit hook; (code, stderr, stdout).

    Exit codes beyond the CLI's: 3 = a secret file was opened, 4 = exit 0 with a wrong result,
    5 = an exception escaped the CLI (its traceback is on stderr), negative = killed by a signal.
    """
    err_path, out_path = workdir / "stderr.txt", workdir / "stdout.txt"
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 5
        try:
            fd_err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fd_out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd_err, 2)
            os.dup2(fd_out, 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            signal.alarm(CASE_TIMEOUT_S)
            limit = _vm_size() + MEMORY_BUDGET
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            secret_real = os.path.realpath(secret)
            secret_inodes = {os.stat(p).st_ino for p in secret.iterdir()}

            def hook(event, args):
                if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                    p = os.fsdecode(args[0])
                    real = os.path.realpath(p)
                    hit = real.startswith(secret_real + os.sep)
                    try:
                        hit = hit or os.stat(p).st_ino in secret_inodes
                    except OSError:
                        pass
                    if hit:
                        os.write(2, f"\nSECRET READ: {p}\n".encode())
                        os._exit(3)

            sys.addaudithook(hook)
            from offsite_ds.cli import main

            code = main(argv)
            if code == 0 and verify is not None:
                try:
                    verify()
                except Exception as exc:  # a wrong result
                    print(f"WRONG RESULT: {type(exc).__name__}: {exc}", file=sys.stderr)
                    code = 4
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 5
        finally:
            try:
                sys.stderr.flush()
                sys.stdout.flush()
            except Exception:
                pass
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, err_path.read_text(errors="replace"), out_path.read_text(errors="replace")


def judge(code: int, stderr: str, command: str) -> str | None:
    """None when the contract held: exit 0, or exit 2 with one error line last on stderr; else the problem."""
    if "Traceback" in stderr:
        return "traceback on stderr"
    if code == 0:
        return None
    if code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(f"offsite-ds {command}: error:")]
        if not lines or not lines[-1].startswith(f"offsite-ds {command}: error:") or len(errors) != 1:
            return "exit 2 without exactly one error line last on stderr"
        return None
    return {3: "read a file outside the artifact", 4: "exit 0 with a wrong result", 5: "exception escaped"}.get(
        code, f"exit code {code}")


def case(seed: Seed, mutation, d, st, root: Path, data_file: Path) -> Outcome:
    """Copy the seed, mutate it, run the receiver's command on it, and judge the outcome."""
    workdir = root / uuid.uuid4().hex[:12]
    workdir.mkdir()
    secret = workdir / SECRET
    secret.mkdir()
    (secret / "hostname").write_text("owner-box-7\n")
    art = workdir / "artifact"
    shutil.copytree(seed.path, art)
    try:
        what = mutation(d, st, art, {"secret": secret})
        out = workdir / "out"
        if seed.kind == "package":
            argv, command = ["plugin", str(seed.model), str(art), "--out", str(out)], "plugin"
            verify = lambda: verify_plugged(art, out)
        else:
            argv, command = ["eval", str(art), "--data", str(data_file), "--seq-len", "16", "--max-tokens", "64"], "eval"
            verify = lambda: verify_eval(workdir / "stdout.txt")
        code, stderr, stdout = run_cli(argv, workdir, secret, verify)
        problem = judge(code, stderr, command)
        if problem is None and code == 2 and seed.kind == "package" and out.exists():
            problem = "refused but left an output directory"
        return Outcome(code, stderr, stdout, problem, f"{seed.name}: {what}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def verify_plugged(package_dir: Path, out: Path) -> None:
    """A plugged model: typed manifest, finite weights, the package's full-mode tensors in place."""
    import torch
    from safetensors.torch import load_file

    from offsite_ds.manifests import PLUGGED_FORMAT, PluggedManifest

    manifest = PluggedManifest.model_validate(json.loads((out / "offsite.json").read_text()))
    assert manifest.format == PLUGGED_FORMAT
    weights = {}
    for f in sorted(out.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), "non-finite weights"
    if manifest.mode in ("full", "bitfit"):
        package = load_file(str(package_dir / "adapter.safetensors"))
        for name, t in package.items():
            assert torch.equal(weights[name], t), f"{name} is not the package's tensor"


def verify_eval(stdout_path: Path) -> None:
    sys.stdout.flush()
    line = next(line for line in stdout_path.read_text().splitlines() if line.startswith("perplexity "))
    assert math.isfinite(float(line.split()[1])), line


def warm_up(seeds: list[Seed], root: Path, data_file: Path) -> None:
    """Run each seed unmutated once in-process: imports everything before forking, and proves the seeds are valid."""
    from offsite_ds.cli import main

    for seed in seeds:
        out = root / f"warm_{seed.name}"
        argv = (["plugin", str(seed.model), str(seed.path), "--out", str(out)] if seed.kind == "package" else
                ["eval", str(seed.path), "--data", str(data_file), "--seq-len", "16", "--max-tokens", "64"])
        assert main(argv) == 0, f"seed {seed.name} is not accepted"
        shutil.rmtree(out, ignore_errors=True)


def fuzz(seeds: list[Seed], root: Path, cases: int, seed: int = 0, log=print) -> dict:
    """Run `cases` hypothesis-drawn cases; returns counts per outcome and the failures (should be none)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    data_file = root / "data.txt"
    counts = {"cases": 0, "accepted": 0, "refused": 0, "failures": []}
    by_kind: dict[str, int] = {}

    @settings(max_examples=cases, deadline=None, database=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(d):
        s = d.draw(st.sampled_from(seeds))
        mutation = d.draw(st.sampled_from(BUNDLE_MUTATIONS if s.kind == "bundle" else PACKAGE_MUTATIONS))
        outcome = case(s, mutation, d, st, root, data_file)
        counts["cases"] += 1
        by_kind[mutation.__name__] = by_kind.get(mutation.__name__, 0) + 1
        counts["accepted" if outcome.code == 0 else "refused"] += 1
        if outcome.problem:
            last = [line for line in outcome.stderr.splitlines() if line.strip()][-3:]
            counts["failures"].append(f"{outcome.mutation}: {outcome.problem}: {' | '.join(last)[:400]}")
            log(f"FAIL {counts['failures'][-1]}")

    from hypothesis import seed as fixed_seed

    fixed_seed(seed)(one)()
    counts["by_mutation"] = by_kind
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where seeds and cases live (default: a temp dir)")
    args = parser.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fuzz_artifacts_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    seeds = build_seeds(root)
    warm_up(seeds, root, root / "data.txt")
    t1 = time.time()
    counts = fuzz(seeds, root, args.cases, args.seed)
    t2 = time.time()
    print(f"{counts['cases']} cases in {t2 - t1:.1f}s (seeds {t1 - t0:.1f}s): {counts['accepted']} accepted "
          f"(exit 0, result checked), {counts['refused']} refused with one line (exit 2), "
          f"{len(counts['failures'])} escaped; by mutation {counts['by_mutation']}")
    for failure in counts["failures"]:
        print(f"  {failure}")
    return 1 if counts["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
