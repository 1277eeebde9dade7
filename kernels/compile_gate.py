"""GPU compile gate without a GPU: compile every Triton kernel in every specialisation the CUDA path launches.

Why: the kernels otherwise only ever run in Triton's interpreter, which accepts code that a real compile
rejects (shared memory over the limit, unsupported dtype combinations, register blow-ups). Triton compiles
for a GPU target on any machine (ptxas ships in its nvidia backend), so this runs on the CPU in CI.

What is compiled is not a hand-written list: the real launch code runs (layer_norm, rms_norm,
bias_activation, lora_linear with gemm="triton", linear_cross_entropy, forward and backward) on CPU tensors
with Triton's launch intercepted. Each intercepted launch (for the autotuned GEMM: each of its autotune
configs) is turned into a compile job by Triton's own argument binder, so signature, constexprs and
alignment specialisation are exactly those a GPU launch would compile. The inputs sweep what changes a
specialisation: dtype (fp32, bf16, fp16), every optional operand and frozen/training flag, the row widths
that select each block/warp configuration of the config functions, and LoRA ranks (BLOCK_R).

Tiers: `ci` keeps one job per (kernel, pointer dtypes, branch constexprs) for sm_90 (the widest realistic
tile first) and the bf16 subset for sm_80; `all` compiles every distinct job for both archs.

Each job runs in a worker process started with TRITON_INTERPRET unset (an LLVM abort kills only that worker
and is reported against its job). Per job: compile time, registers, stack/local bytes (ptxas spills live
there), shared memory, and for kernels whose hot loop is `tl.dot` in a half type whether the PTX uses the
tensor cores (`wgmma` on sm_90, `mma.sync` on sm_80).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ARCHS = (90, 80)
TIERS = ("ci", "all")
KERNEL_MODULES = ("bias_activation", "layer_norm", "linear_cross_entropy", "lora_linear")
LORA_RANKS = (8, 32, 64)  # BLOCK_R = max(16, next_power_of_2(r)): 16, 32, 64


# ---------------------------------------------------------------- recording the launch path (worker side)

def _modules():
    return [importlib.import_module(f"offsite_ds.kernels.{name}") for name in KERNEL_MODULES]


def launched_kernels() -> dict[str, object]:
    """Every `*_kernel` JITFunction defined in the kernel modules (what the gate must cover)."""
    from triton.runtime.jit import JITFunction

    found = {}
    for module in _modules():
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__:
                found[name] = obj
    return found


@contextlib.contextmanager
def _intercepted(launches: list):
    """Run the launch code on CPU tensors with every Triton launch recorded instead of run."""
    runtime = importlib.import_module("offsite_ds.kernels.runtime")
    lora = importlib.import_module("offsite_ds.kernels.lora_linear")
    kernels = launched_kernels()
    saved_runs_on = runtime.triton_runs_on
    runtime.triton_runs_on = lambda *tensors: True

    def recorder(kernel):
        def run(*args, grid=None, warmup=False, **kwargs):
            launches.append((kernel, args, kwargs))
        return run

    for kernel in kernels.values():
        kernel.run = recorder(kernel)
    tuned = lora._autotuned()

    def tuned_run(*args, grid=None, warmup=False, **kwargs):
        for config in tuned.configs:
            launches.append((tuned.fn, args, {**kwargs, **config.all_kwargs()}))

    tuned.run = tuned_run
    try:
        yield
    finally:
        runtime.triton_runs_on = saved_runs_on
        for kernel in kernels.values():
            kernel.__dict__.pop("run", None)
        tuned.__dict__.pop("run", None)


def _widths(ci_width: int, widest: int) -> list[int]:
    """The realistic width first (the CI tier keeps the first job per branch), then every power of two up to
    `widest`: each one selects a different block configuration in the config functions."""
    sweep = [2 ** i for i in range(widest.bit_length()) if 2 ** i <= widest]
    return [ci_width] + [w for w in sweep if w != ci_width]


def _backward(y):
    import torch

    torch.autograd.backward(y, torch.zeros_like(y))


def _param(n: int, trains: bool, dtype):
    import torch

    return torch.zeros(n, dtype=dtype).requires_grad_(trains)


def _drive_layer_norm(dtype, sweep: bool) -> None:
    """LayerNorm (weight/bias present or not, frozen or training), RMSNorm (weight in x's dtype or fp32)."""
    import torch

    from offsite_ds.kernels.layer_norm import MAX_FUSED_COLUMNS, layer_norm, rms_norm

    for width in (_widths(2048, MAX_FUSED_COLUMNS) if sweep else [2048]):
        x = torch.zeros(4, width, dtype=dtype, requires_grad=True)
        frozen, trains = (lambda: _param(width, False, dtype)), (lambda: _param(width, True, dtype))
        for weight, bias in ((None, None), (frozen(), None), (frozen(), frozen()), (trains(), trains()),
                             (trains(), None)):
            _backward(layer_norm(x, weight, bias))
        for wdt in {dtype, torch.float32}:
            for trains in (False, True):
                _backward(rms_norm(x, _param(width, trains, wdt)))
        _backward(rms_norm(x, None))


def _drive_bias_activation(dtype, sweep: bool) -> None:
    """Fused bias + activation after the MLP's first matmul: each activation, bias absent/frozen/training."""
    import torch

    from offsite_ds.kernels.bias_activation import ACTIVATIONS, bias_activation

    for width in (_widths(1024, 1024) if sweep else [1024]):
        x = torch.zeros(4, width, dtype=dtype, requires_grad=True)
        for kind in ACTIVATIONS:
            for bias in (None, _param(width, False, dtype), _param(width, True, dtype)):
                _backward(bias_activation(x, bias, kind))


def _drive_linear_cross_entropy(dtype, sweep: bool) -> None:
    """Frozen-head linear cross-entropy: whole-vocabulary rows and vocabulary-chunked rows, with and
    without a bias, loss only (eval) and loss + gradient."""
    import torch

    from offsite_ds.kernels.linear_cross_entropy import MIN_TOKEN_CHUNK, linear_cross_entropy

    hidden_size = 16
    for vocab in (_widths(50272, 32768) + [50272] if sweep else [50272]):
        weight = torch.zeros(vocab, hidden_size, dtype=dtype)
        targets = torch.zeros(MIN_TOKEN_CHUNK, dtype=torch.long)
        for bias in (None, torch.zeros(vocab, dtype=dtype)):
            for chunk in (None, max(1, vocab // 2)):
                for trains in (False, True):
                    hidden = torch.zeros(MIN_TOKEN_CHUNK, hidden_size, dtype=dtype, requires_grad=trains)
                    loss = linear_cross_entropy(hidden, weight, targets, bias, vocab_chunk=chunk)
                    if trains:
                        loss.backward()


def _drive_lora_linear(dtype, sweep: bool) -> None:
    """LoRA through the fused Triton GEMM (fp32 takes cuBLAS by design: nothing to record): ranks, both
    weight layouts (their strides specialise differently), bias, LoRA dropout."""
    import torch

    from offsite_ds.kernels.lora_linear import lora_linear

    m, k, n = 64, 256, 384
    for rank in (LORA_RANKS if sweep else LORA_RANKS[:1]):
        for in_out in (False, True):
            weight = torch.zeros((k, n) if in_out else (n, k), dtype=dtype)
            for bias in (None, torch.zeros(n, dtype=dtype)):
                for dropout in (False, True):
                    x = torch.zeros(m, k, dtype=dtype, requires_grad=True)
                    a = torch.zeros(rank, k, requires_grad=True)
                    b = torch.zeros(n, rank, requires_grad=True)
                    _backward(lora_linear(x, weight, bias, a, b, 2.0, in_out, x * 1.0 if dropout else None,
                                          gemm="triton"))


DRIVERS = {"bias_activation": _drive_bias_activation, "layer_norm": _drive_layer_norm,
           "linear_cross_entropy": _drive_linear_cross_entropy, "lora_linear": _drive_lora_linear}


def _drive(tier: str, modules: tuple[str, ...] = KERNEL_MODULES) -> None:
    """Call the public kernels the way the patched model does, over the inputs that change a specialisation."""
    import torch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for module in modules:
            DRIVERS[module](dtype, tier == "all")


def _binder(kernel, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def _branch_constexprs(kernel, constexprs: dict) -> dict:
    """Named constexprs that select a code path (flags, activation codes, precision), not tile sizes."""
    names = [p.name for p in kernel.params]
    out = {}
    for path, value in constexprs.items():
        name = names[path[0]]
        declared = kernel.params[path[0]].is_constexpr
        if declared and not name.startswith(("BLOCK_", "GROUP_")):
            out[name] = value
    return out


def jobs(tier: str, archs: tuple[int, ...] = ARCHS, kernel: str | None = None) -> list[dict]:
    """The compile jobs of a tier (of one kernel): descriptions recomputed by each worker, so they are stable."""
    if tier not in TIERS:
        raise ValueError(f"tier '{tier}' is not one of {', '.join(TIERS)}")
    modules = KERNEL_MODULES
    if kernel is not None:
        known = launched_kernels()
        if kernel not in known:
            raise ValueError(f"kernel '{kernel}' is not one of {', '.join(sorted(known))}")
        modules = (known[kernel].__module__.rpartition(".")[2],)
    launches: list = []
    with _intercepted(launches):
        _drive(tier, modules)
    out, seen, ci_seen = [], set(), set()
    for arch in archs:
        for fn, args, kwargs in launches:
            backend, binder = _binder(fn, arch)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            dtypes = "/".join(sorted({t[1:] for t in signature.values() if t.startswith("*")}))
            branch = _branch_constexprs(fn, constexprs)
            tiles = {fn.params[p[0]].name: v for p, v in constexprs.items() if fn.params[p[0]].is_constexpr
                     and fn.params[p[0]].name.startswith(("BLOCK_", "GROUP_"))}
            key = (fn.__name__, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), options.num_warps, options.num_stages)
            if key in seen or kernel not in (None, fn.__name__):
                continue
            seen.add(key)
            ci_key = (fn.__name__, arch, dtypes, repr(sorted(branch.items())))
            if tier == "ci":
                if ci_key in ci_seen or (arch != ARCHS[0] and "bf16" not in dtypes):
                    continue
                ci_seen.add(ci_key)
            out.append({"kernel": fn.__name__, "arch": arch, "dtypes": dtypes, "branch": branch, "tiles": tiles,
                        "num_warps": options.num_warps, "num_stages": options.num_stages,
                        "dot": "tl.dot(" in fn.src})
            out[-1]["_compile"] = (fn, signature, constexprs, attrs, options)
    return out


def _resource_usage(cubin: bytes, arch: int) -> dict:
    """Registers, stack and local bytes (where ptxas puts spills) of a cubin, read with the bundled cuobjdump."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}
    return {"regs": found.get("reg", -1), "stack": found.get("stack", 0), "local": found.get("local", 0)}


def compile_job(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs, options = job["_compile"]
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", job["arch"], 32), options=options.__dict__)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm["cubin"], job["arch"])
    return {**_public(job), "seconds": round(seconds, 2), **usage, "shared": compiled.metadata.shared,
            "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx}


def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def worker(tier: str, archs: tuple[int, ...], index: int, count: int, kernel: str | None) -> None:
    """Compile this worker's share; one JSON line per job ("start" first, so an abort names its job)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("the compile gate's worker must start with TRITON_INTERPRET unset")
    todo = jobs(tier, archs, kernel)[index::count]
    for job in todo:
        print(json.dumps({"start": _public(job)}), flush=True)
        try:
            result = compile_job(job)
        except Exception as exc:  # noqa: BLE001 - every failure is reported against its job
            result = {**_public(job), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(json.dumps({"done": result}), flush=True)


# ---------------------------------------------------------------- orchestration (any process)

def _clean_env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=cache_dir, TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"))
    return env


def list_jobs(tier: str, archs: tuple[int, ...] = ARCHS, kernel: str | None = None) -> dict:
    """{"jobs": [...], "kernels": [...]} computed in a clean process (no interpreter)."""
    proc = subprocess.run([sys.executable, "-m", "offsite_ds.kernels.compile_gate", "--list", "--tier", tier,
                           "--arch", ",".join(map(str, archs))] + (["--kernel", kernel] if kernel else []),
                          capture_output=True, text=True,
                          env=_clean_env(tempfile.gettempdir()))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout)


def run_gate(tier: str = "ci", archs: tuple[int, ...] = ARCHS, jobs_n: int = 1, index: int = 0, count: int = 1,
             kernel: str | None = None, cache_dir: str | None = None) -> list[dict]:
    """Compile the tier's share (index/count of it) in `jobs_n` worker processes; one dict per job.

    A fresh Triton cache is used unless `cache_dir` is given, so every run really compiles.
    """
    with contextlib.ExitStack() as stack:
        cache = cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="compile-gate-"))
        procs = []
        for j in range(jobs_n):
            cmd = [sys.executable, "-m", "offsite_ds.kernels.compile_gate", "--worker", "--tier", tier,
                   "--arch", ",".join(map(str, archs)), "--index", str(index * jobs_n + j),
                   "--count", str(count * jobs_n)] + (["--kernel", kernel] if kernel else [])
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=_clean_env(cache)))
        results = []
        for proc in procs:
            out, err = proc.communicate()
            started = None
            for line in out.splitlines():
                record = json.loads(line)
                started = record.get("start")
                if "done" in record:
                    results.append(record["done"])
            if proc.returncode != 0:
                where = started or {"kernel": "<enumeration>", "arch": None}
                tail = (err.strip().splitlines() or ["no output"])[-1]
                results.append({**where, "error": f"worker exited {proc.returncode}: {tail}"})
    return results


def failures(results: list[dict]) -> list[str]:
    """Compile errors, and half-type tl.dot kernels whose PTX has no tensor-core instruction."""
    bad = []
    for r in results:
        name = f"{r.get('kernel')} sm_{r.get('arch')} {r.get('dtypes', '')} {r.get('branch', '')} {r.get('tiles', '')}"
        if "error" in r:
            bad.append(f"{name}: {r['error']}")
        elif r.get("dot") and re.search(r"\b(bf16|fp16)\b", r["dtypes"]):
            if not (r["wgmma"] if r["arch"] >= 90 else r["mma_sync"]):
                bad.append(f"{name}: no {'wgmma' if r['arch'] >= 90 else 'mma.sync'} in the PTX of a half-type tl.dot")
    return bad


def report(results: list[dict]) -> str:
    """Per kernel and arch: jobs, compile seconds, max registers, jobs with stack/local bytes (spills)."""
    rows: dict[tuple, dict] = {}
    for r in results:
        if "error" in r:
            continue
        row = rows.setdefault((r["kernel"], r["arch"]), {"jobs": 0, "seconds": 0.0, "regs": 0, "spilling": 0,
                                                          "max_spill": 0, "tc": 0})
        row["jobs"] += 1
        row["seconds"] += r["seconds"]
        row["regs"] = max(row["regs"], r["regs"])
        spill = r["stack"] + r["local"]
        row["spilling"] += spill > 0
        row["max_spill"] = max(row["max_spill"], spill)
        row["tc"] += bool(r["wgmma"] or r["mma_sync"])
    lines = [f"{'kernel':34} {'arch':>5} {'jobs':>5} {'compile s':>9} {'max regs':>8} {'spilling':>8} "
             f"{'max spill B':>11} {'tensor-core':>11}"]
    for (kernel, arch), row in sorted(rows.items()):
        lines.append(f"{kernel:34} sm_{arch:<2} {row['jobs']:>5} {row['seconds']:>9.1f} {row['regs']:>8} "
                     f"{row['spilling']:>8} {row['max_spill']:>11} {row['tc']:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compile_gate", description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="the full matrix (default: the CI tier)")
    p.add_argument("--tier", choices=TIERS, default=None)
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--kernel", default=None, help="only this kernel (function name)")
    p.add_argument("--json", default=None, help="write every job's result here")
    p.add_argument("--list", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tier = args.tier or ("all" if args.all else "ci")
    archs = tuple(int(a) for a in args.arch.split(","))
    if args.list:
        listing = [_public(j) for j in jobs(tier, archs, args.kernel)]
        print(json.dumps({"jobs": listing, "kernels": sorted(launched_kernels())}))
        return 0
    if args.worker:
        worker(tier, archs, args.index, args.count, args.kernel)
        return 0
    start = time.perf_counter()
    results = run_gate(tier, archs, max(1, args.jobs), kernel=args.kernel)
    wall = time.perf_counter() - start
    print(report(results))
    bad = failures(results)
    print(f"{len(results)} compile jobs ({tier} tier, sm_{', sm_'.join(map(str, archs))}) in {wall:.0f} s "
          f"with {args.jobs} worker(s); {len(bad)} failure(s)")
    for line in bad[:20]:
        print("FAIL", line)
    if len(bad) > 20:
        print(f"... and {len(bad) - 20} more (--json has every job)")
    if args.json:
        from offsite_ds.atomic import write_json

        write_json(args.json, results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
