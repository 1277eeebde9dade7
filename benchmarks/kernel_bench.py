#!/usr/bin/env python
"""Kernel micro-benchmarks: each fused kernel against torch eager, torch.compile, Liger-Kernel and Apple's Cut
Cross-Entropy (where they have an equivalent), at the real shapes, plus the patched emulator training step.

Baselines are the ones a user would really run: the CE eager baseline includes the frozen fp32 head under
bf16 autocast (how `tune` trains), LoRA is compared with PEFT's maths under autocast and with cuBLAS +
`addmm_` (our default), and peak memory is measured after a warm-up call (compiling and autotuning excluded).

    python benchmarks/kernel_bench.py                       # on a CUDA GPU: everything, batch 1 2 4 8 x 512 tokens
    python benchmarks/kernel_bench.py --kernels ce --batch 1,8
    python benchmarks/kernel_bench.py --cpu-smoke --out /tmp/k   # tiny shapes on CPU: checks that it runs

Writes `kernels.json` (device, date, versions, command, every figure) and `kernels.md` (tables, targets)
into --out (default benchmarks/results/<date>-<device>/kernels/), rewritten after every figure. Each figure: median and 20/80 percentile
time (CUDA: triton's do_bench, L2 flushed between runs; CPU: wall clock), peak memory above the inputs after
a warm-up call (CUDA only), and
achieved TFLOP/s (matmul kernels, FLOPs counted for a frozen head/base: no weight gradient) or TB/s
(memory-bound kernels, bytes that must move at least once). A case that runs out of memory is recorded as
OOM; an implementation that is not installed is recorded as skipped with the reason.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from offsite_ds.paper_models import mlp_dims

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "offsite-ds-kernel-bench"
KERNELS = ("ce", "layer_norm", "rms_norm", "bias_act", "lora", "step")
# name -> hidden, vocab, MLP width, MLP activation (from the one table of the paper's models)
SHAPES = {name: mlp_dims(name) for name in ("opt-1.3b", "opt-6.7b", "bloom-7b1")}
SMOKE_SHAPES = {"tiny-opt": (32, 1000, 128, "relu"), "tiny-bloom": (32, 5000, 128, "gelu_tanh")}
TARGETS = {
    "ce_vs_liger_speed": 1.2,  # frozen-head linear CE at V=250,880: >= 1.2x faster than Liger's
    "ce_vs_eager_memory": 4.0,  # ... and >= 4x less peak memory than eager
    "layer_norm_frozen_backward": 1.5,  # frozen-mode LayerNorm backward >= 1.5x eager
    "step_tokens_per_s": 1.3,  # patched OPT-1.3B 2-8-2 training step >= 1.3x eager tokens/s
}


# ---------------------------------------------------------------- measuring

class Bench:
    """Times a callable and measures its peak memory on the chosen device."""

    def __init__(self, device: torch.device, smoke: bool, reps: int):
        self.device = device
        self.smoke = smoke
        self.reps = reps

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn) -> tuple[float, float, float]:
        """(median, 20th, 80th percentile) milliseconds."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            median, p20, p80 = do_bench(fn, warmup=25, rep=max(50, self.reps * 10), quantiles=[0.5, 0.2, 0.8])
            return float(median), float(p20), float(p80)
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
        return statistics.median(times), pick(0.2), pick(0.8)

    def peak_mib(self, fn) -> float | None:
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def run(self, kernel: str, shape: dict, impl: str, fn, work: tuple[str, float] | None, prepare=None) -> dict:
        """Measure `fn` (or the callable `prepare()` returns: set-up such as a forward pass whose backward
        is timed, or a model build, runs inside the same error handling but outside the measurement)."""
        row = {"kernel": kernel, "shape": shape, "impl": impl}
        try:
            if prepare is not None:
                fn = prepare()
            fn()  # warm-up: compiling, autotuning and caches stay out of both the peak and the times
            self.sync()
            peak = self.peak_mib(fn)
            ms, p20, p80 = self.time_ms(fn)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {**row, "status": "oom"}
        except Exception as exc:  # noqa: BLE001 - one failing implementation must not end the run
            return {**row, "status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                    "traceback": traceback.format_exc(limit=3)[-1500:]}
        row.update(status="ok", median_ms=round(ms, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                   peak_mib=None if peak is None else round(peak, 1))
        if work is not None:
            unit, amount = work
            row["achieved"] = {"unit": unit, "value": float(f"{amount / (ms * 1e-3) / 1e12:.4g}")}
        return row


def skipped(kernel: str, shape: dict, impl: str, reason: str) -> dict:
    return {"kernel": kernel, "shape": shape, "impl": impl, "status": "skipped", "reason": reason}


def liger():
    """Liger-Kernel's modules, or None when it is not installed (its columns are then skipped)."""
    try:
        import liger_kernel.transformers as lk
    except ImportError:
        return None
    return lk


def compiled(fn, bench: Bench):
    if bench.smoke:
        return None
    return torch.compile(fn, dynamic=False)


def ours_label() -> str:
    from offsite_ds.kernels.runtime import INTERPRETING

    if torch.cuda.is_available():
        return "ours (triton)"
    return "ours (triton interpreter)" if INTERPRETING else "ours (reference path: no GPU, no interpreter)"


# ---------------------------------------------------------------- kernels

def bench_ce(bench: Bench, name: str, hidden: int, vocab: int, tokens: int, dtype) -> list[dict]:
    from offsite_ds.kernels import linear_cross_entropy
    from offsite_ds.kernels.linear_cross_entropy import LIBRARIES, library_available, library_linear_cross_entropy

    dev = bench.device
    shape = {"model": name, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype)}
    h = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev, dtype=dtype) * hidden ** -0.5)
    y = torch.randint(0, vocab, (tokens,), device=dev)
    flops = 4.0 * tokens * vocab * hidden  # logits + d(hidden); no head-weight gradient

    def eager_fn():
        h.grad = None
        F.cross_entropy(F.linear(h, w).float(), y).backward()

    def ours_fn():
        h.grad = None
        linear_cross_entropy(h, w, y).backward()

    w32 = w.float()  # what `tune` really holds: a frozen fp32 head, the matmul under bf16 autocast

    def eager_autocast_fn():
        h.grad = None
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = F.linear(h, w32)
        F.cross_entropy(logits.float(), y).backward()

    rows = [bench.run("ce", shape, "eager", eager_fn, ("TFLOP/s", flops)),
            bench.run("ce", shape, "eager (fp32 head, autocast)", eager_autocast_fn, ("TFLOP/s", flops))]
    comp = compiled(lambda: F.cross_entropy(F.linear(h, w).float(), y), bench)
    rows.append(skipped("ce", shape, "torch.compile", "--cpu-smoke skips torch.compile") if comp is None else
                bench.run("ce", shape, "torch.compile", lambda: (setattr(h, "grad", None), comp().backward()),
                          ("TFLOP/s", flops)))
    for lib, (package, _) in LIBRARIES.items():  # Liger-Kernel's and Cut Cross-Entropy's fused linear CE
        if not library_available(lib):
            rows.append(skipped("ce", shape, lib, f"{package} is not installed"))
        elif dev.type != "cuda":
            rows.append(skipped("ce", shape, lib, f"{package} needs CUDA"))
        else:
            def lib_fn(lib=lib):
                h.grad = None
                library_linear_cross_entropy(lib, h, w, y).backward()

            rows.append(bench.run("ce", shape, lib, lib_fn, ("TFLOP/s", flops)))
    rows.append(bench.run("ce", shape, ours_label(), ours_fn, ("TFLOP/s", flops)))
    if rows[-1]["status"] == "ok":  # agreement with eager on this input: a fast wrong result is worthless
        try:
            eager_fn()
            g_ref = h.grad.clone()
            ours_fn()
            rows[-1]["max_abs_grad_diff_vs_eager"] = float((h.grad.float() - g_ref.float()).abs().max())
        except torch.cuda.OutOfMemoryError:
            rows[-1]["max_abs_grad_diff_vs_eager"] = None
    return rows


def bench_norm(bench: Bench, name: str, hidden: int, tokens: int, dtype, rms: bool) -> list[dict]:
    from offsite_ds.kernels import layer_norm, reference_rms_norm, rms_norm

    kernel = "rms_norm" if rms else "layer_norm"
    dev = bench.device
    rows = []
    for frozen in (True, False):
        shape = {"model": name, "tokens": tokens, "hidden": hidden, "dtype": str(dtype),
                 "affine": "frozen" if frozen else "trainable", "pass": "backward"}
        x = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
        w = torch.ones(hidden, device=dev, dtype=dtype, requires_grad=not frozen)
        b = None if rms else torch.zeros(hidden, device=dev, dtype=dtype, requires_grad=not frozen)
        dy = torch.randn_like(x)
        leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
        moved = 3.0 * tokens * hidden * x.element_size()  # read x and dy, write dx

        def eager_fwd():
            return reference_rms_norm(x, w, 1e-6) if rms else F.layer_norm(x, (hidden,), w, b, 1e-5)

        def ours_fwd():
            return rms_norm(x, w, 1e-6) if rms else layer_norm(x, w, b, 1e-5)

        def backward_of(forward):
            def prepare():
                out = forward()
                return lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True)
            return prepare

        rows.append(bench.run(kernel, shape, "eager", None, ("TB/s", moved), prepare=backward_of(eager_fwd)))
        comp = compiled(eager_fwd, bench)
        rows.append(skipped(kernel, shape, "torch.compile", "--cpu-smoke skips torch.compile") if comp is None
                    else bench.run(kernel, shape, "torch.compile", None, ("TB/s", moved), prepare=backward_of(comp)))
        lk = liger()
        if lk is None or dev.type != "cuda":
            rows.append(skipped(kernel, shape, "liger", "liger-kernel is not installed" if lk is None
                                else "Liger-Kernel needs CUDA"))
        else:
            module = (lk.LigerRMSNorm(hidden, eps=1e-6) if rms else lk.LigerLayerNorm(hidden, eps=1e-5)).to(dev, dtype)
            module.requires_grad_(not frozen)
            rows.append(bench.run(kernel, shape, "liger", None, ("TB/s", moved), prepare=backward_of(lambda: module(x))))
        rows.append(bench.run(kernel, shape, ours_label(), None, ("TB/s", moved), prepare=backward_of(ours_fwd)))
    return rows


def bench_bias_act(bench: Bench, name: str, hidden: int, ffn: int, tokens: int, dtype, kind: str) -> list[dict]:
    from offsite_ds.kernels import bias_activation, reference_bias_activation

    dev = bench.device
    shape = {"model": name, "tokens": tokens, "width": ffn, "dtype": str(dtype), "activation": kind,
             "bias": "frozen", "pass": "forward+backward"}
    x = torch.randn(tokens, ffn, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(ffn, device=dev, dtype=dtype)
    dy = torch.randn_like(x)
    moved = 5.0 * tokens * ffn * x.element_size()  # fwd: read x, write y; bwd: read dy and saved, write dx

    def step(forward):
        def fn():
            torch.autograd.grad(forward(), [x], dy)
        return fn

    rows = [bench.run("bias_act", shape, "eager", step(lambda: reference_bias_activation(x, b, kind)), ("TB/s", moved))]
    comp = compiled(lambda: reference_bias_activation(x, b, kind), bench)
    rows.append(skipped("bias_act", shape, "torch.compile", "--cpu-smoke skips torch.compile") if comp is None
                else bench.run("bias_act", shape, "torch.compile", step(comp), ("TB/s", moved)))
    rows.append(skipped("bias_act", shape, "liger", "Liger-Kernel has no bias+ReLU/GELU kernel (only gated GeGLU/SwiGLU)"))
    rows.append(bench.run("bias_act", shape, ours_label(), step(lambda: bias_activation(x, b, kind)), ("TB/s", moved)))
    return rows


def bench_lora(bench: Bench, name: str, hidden: int, tokens: int, dtype, rank: int = 8) -> list[dict]:
    from offsite_ds.kernels import lora_linear, reference_lora_linear

    dev = bench.device
    shape = {"model": name, "tokens": tokens, "in": hidden, "out": hidden, "rank": rank, "dtype": str(dtype),
             "pass": "forward+backward"}
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(hidden, hidden, device=dev, dtype=dtype) * hidden ** -0.5
    bias = torch.zeros(hidden, device=dev, dtype=dtype)
    a = (torch.randn(rank, hidden, device=dev) * hidden ** -0.5).requires_grad_(True)  # PEFT: fp32 adapters
    bb = (torch.randn(hidden, rank, device=dev) * 0.01).requires_grad_(True)
    dy = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    flops = 4.0 * tokens * hidden * hidden + 8.0 * tokens * rank * 2 * hidden  # base fwd+dx; low-rank paths

    def step(forward):
        def fn():
            torch.autograd.grad(forward(), [x, a, bb], dy)
        return fn

    def peft():  # what PEFT runs under `tune`'s autocast: base linear, then lora_B(lora_A(x)) * s, then add
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            return F.linear(x, w, bias) + F.linear(F.linear(x, a), bb) * 2.0

    rows = [bench.run("lora", shape, "eager (PEFT under autocast)", step(peft), ("TFLOP/s", flops))]
    comp = compiled(lambda: reference_lora_linear(x, w, bias, a, bb, 2.0), bench)
    rows.append(skipped("lora", shape, "torch.compile", "--cpu-smoke skips torch.compile") if comp is None
                else bench.run("lora", shape, "torch.compile", step(comp), ("TFLOP/s", flops)))
    rows.append(skipped("lora", shape, "liger", "Liger-Kernel has no LoRA linear kernel"))
    rows.append(bench.run("lora", shape, "cuBLAS + addmm_ (default)",
                          step(lambda: lora_linear(x, w, bias, a, bb, 2.0, gemm="cublas")), ("TFLOP/s", flops)))
    rows.append(bench.run("lora", shape, ours_label(),  # the fused Triton GEMM: kept only if it beats the row above
                          step(lambda: lora_linear(x, w, bias, a, bb, 2.0, gemm="triton")), ("TFLOP/s", flops)))
    return rows


def bench_step(bench: Bench, batch: int, seq_len: int, smoke: bool) -> list[dict]:
    """One optimizer step of the data owner's OPT-1.3B 2-8-2 emulator (bf16 autocast, fp32 weights, as
    `offsite-ds tune` trains), eager vs patched, in tokens/s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from offsite_ds.bench.shapes import BUILTIN
    from offsite_ds.kernels import patch
    from offsite_ds.peft_modes import apply_mode
    from offsite_ds.sandwich import Layout

    model_type, fields, layout = BUILTIN["opt-1.3b"]
    fields = dict(fields)
    if smoke:
        fields.update(hidden_size=32, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=32, vocab_size=258,
                      pad_token_id=257, bos_token_id=256, eos_token_id=256)
    lay = Layout.parse(layout, fields["num_hidden_layers"])
    fields["num_hidden_layers"] = lay.depth  # the emulator's depth; same block shapes
    config = AutoConfig.for_model(model_type, **fields)
    dev = bench.device
    rows = []
    for mode in ("full", "lora"):
        shape = {"model": "tiny-opt" if smoke else "opt-1.3b", "layout": layout, "mode": mode, "batch": batch,
                 "seq_len": seq_len, "precision": "bf16 autocast" if dev.type == "cuda" else "fp32"}
        for impl in ("eager", ours_label(), "liger", "cce"):
            if impl in ("liger", "cce"):
                from offsite_ds.kernels.linear_cross_entropy import library_available

                if dev.type != "cuda" or not library_available(impl):
                    rows.append(skipped("step", shape, impl, "needs CUDA and the library installed"))
                    continue
            held = {}

            def prepare(impl=impl, mode=mode, held=held):
                torch.manual_seed(0)
                with torch.device(dev):
                    model = AutoModelForCausalLM.from_config(config)
                apply_mode(model, lay.adapter_positions, mode)
                model.train()
                if impl in ("liger", "cce"):  # the library's fused loss; the rest eager (--kernels liger|cce)
                    patch(model, ("loss",), loss_impl=impl)
                elif impl != "eager":
                    patch(model)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
                ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=dev)
                held.update(model=model, opt=opt)

                def fn():
                    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else _null()
                    with ctx:
                        loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return fn

            row = bench.run("step", shape, impl, None, None, prepare=prepare)
            if row.get("status") == "ok":
                row["tokens_per_s"] = round(batch * seq_len / (row["median_ms"] * 1e-3), 1)
            rows.append(row)
            held.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _null():
    import contextlib

    return contextlib.nullcontext()


# ---------------------------------------------------------------- report

def _find(rows, kernel, impl_prefix, **shape):
    for r in rows:
        if r["kernel"] == kernel and r["impl"].startswith(impl_prefix) and r.get("status") == "ok" \
                and all(r["shape"].get(k) == v for k, v in shape.items()):
            return r
    return None


def evaluate_targets(rows: list[dict], device_type: str, smoke: bool) -> list[dict]:
    """Each target per shape where both sides were measured; on CPU/smoke runs: not evaluated."""
    if smoke or device_type != "cuda":
        return [{"target": name, "required": req, "status": "not evaluated (no GPU figures in this run)"}
                for name, req in TARGETS.items()]
    out = []
    for r in rows:
        if not r["impl"].startswith("ours") or r.get("status") != "ok":
            continue
        s = r["shape"]
        if r["kernel"] == "ce" and s["vocab"] == 250880:
            lig = _find(rows, "ce", "liger", **s)
            eag = _find(rows, "ce", "eager", **s)
            if lig:
                val = lig["median_ms"] / r["median_ms"]
                out.append({"target": "ce_vs_liger_speed", "shape": s, "value": round(val, 3),
                            "required": TARGETS["ce_vs_liger_speed"], "met": val >= TARGETS["ce_vs_liger_speed"]})
            if eag and r["peak_mib"]:
                val = eag["peak_mib"] / r["peak_mib"]
                out.append({"target": "ce_vs_eager_memory", "shape": s, "value": round(val, 3),
                            "required": TARGETS["ce_vs_eager_memory"], "met": val >= TARGETS["ce_vs_eager_memory"]})
        if r["kernel"] == "layer_norm" and s.get("affine") == "frozen":
            eag = _find(rows, "layer_norm", "eager", **s)
            if eag:
                val = eag["median_ms"] / r["median_ms"]
                out.append({"target": "layer_norm_frozen_backward", "shape": s, "value": round(val, 3),
                            "required": TARGETS["layer_norm_frozen_backward"],
                            "met": val >= TARGETS["layer_norm_frozen_backward"]})
        if r["kernel"] == "step" and s["model"] == "opt-1.3b":
            eag = _find(rows, "step", "eager", **s)
            if eag:
                val = r["tokens_per_s"] / eag["tokens_per_s"]
                out.append({"target": "step_tokens_per_s", "shape": s, "value": round(val, 3),
                            "required": TARGETS["step_tokens_per_s"], "met": val >= TARGETS["step_tokens_per_s"]})
    for name, req in TARGETS.items():
        if not any(t["target"] == name for t in out):
            out.append({"target": name, "required": req, "status": "not measured in this run"})
    return out


def markdown(results: dict) -> str:
    lines = [f"# Kernel micro-benchmarks ({results['date']})", "",
             f"Device: {results['device']['name']} ({results['device']['type']}). Command: `{results['command']}`",
             ""]
    if results["smoke"]:
        lines += ["**CPU smoke run at tiny shapes: these timings say nothing about GPU performance.**", ""]
    lines += ["| kernel | shape | impl | status | median ms | peak MiB | achieved |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["results"]:
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        ach = r.get("achieved")
        ach_s = f"{ach['value']} {ach['unit']}" if ach else (f"{r['tokens_per_s']} tok/s" if "tokens_per_s" in r else "")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        lines.append(f"| {r['kernel']} | {shape} | {r['impl']} | {status} | {r.get('median_ms', '')} | "
                     f"{r.get('peak_mib') if r.get('peak_mib') is not None else ''} | {ach_s} |")
    lines += ["", "## Targets", ""]
    for t in results["targets"]:
        if "value" in t:
            lines.append(f"- {t['target']} {t['shape']}: {t['value']}x (required {t['required']}x): "
                         f"{'met' if t['met'] else 'NOT met'}")
        else:
            lines.append(f"- {t['target']} (required {t['required']}x): {t['status']}")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path) -> None:
    from offsite_ds.atomic import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "kernels.json", results)
    tmp = out_dir / ".kernels.md.tmp"
    tmp.write_text(markdown(results))
    tmp.replace(out_dir / "kernels.md")


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--batch", default="1,2,4,8", help="rows of --seq-len tokens, comma list")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions on CPU (CUDA: do_bench decides)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<date>-<device>/kernels)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks that everything runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from offsite_ds.bench.devices import describe_device
    from offsite_ds.bench.report import RESULTS_ROOT, results_folder_name, versions

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        print(f"error: unknown kernel(s) {', '.join(sorted(unknown))}; choose from {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    smoke = args.cpu_smoke
    if smoke:
        device, dtype, shapes, batches, seq_len, reps = torch.device("cpu"), torch.float32, SMOKE_SHAPES, [2], 16, 2
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; run with --cpu-smoke for the tiny CPU check", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in names if m not in SHAPES]
        if bad:
            print(f"error: unknown model shape(s) {', '.join(bad)}; choose from {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        shapes = {m: SHAPES[m] for m in names}
        batches, seq_len, reps = [int(b) for b in args.batch.split(",")], args.seq_len, args.reps
    bench = Bench(device, smoke, reps)
    now = time.gmtime()
    info = describe_device(device)
    results = {
        "format": FORMAT, "format_version": 1, "date": time.strftime("%Y-%m-%d", now),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", now), "command": " ".join(["python", "benchmarks/kernel_bench.py",
                                                                                  *(sys.argv[1:] if argv is None else argv)]),
        "device": info.to_json(), "versions": {**versions(), "liger-kernel": _version("liger-kernel"),
                                               "cut-cross-entropy": _version("cut-cross-entropy")},
        "smoke": smoke, "ours": ours_label(), "seq_len": seq_len, "batches": batches, "results": [],
    }
    rows = results["results"]
    slug_device = {"type": device.type, "name": info.name}
    out = Path(args.out) if args.out else ROOT / RESULTS_ROOT / results_folder_name(results["date"], slug_device,
                                                                                    smoke) / "kernels"

    def measured(new_rows: list[dict]) -> None:
        """Record figures as they come: a run stopped at its time limit keeps everything measured so far."""
        rows.extend(new_rows)
        results["targets"] = evaluate_targets(rows, device.type, smoke)
        write_results(results, out)

    for batch in batches:
        tokens = batch * seq_len
        for name, (hidden, vocab, ffn, activation) in shapes.items():
            if "ce" in kernels:
                measured(bench_ce(bench, name, hidden, vocab, tokens, dtype))
            if "layer_norm" in kernels:
                measured(bench_norm(bench, name, hidden, tokens, dtype, rms=False))
            if "rms_norm" in kernels and name == next(iter(shapes)):
                measured(bench_norm(bench, name, hidden, tokens, dtype, rms=True))
            if "bias_act" in kernels:
                measured(bench_bias_act(bench, name, hidden, ffn, tokens, dtype, activation))
            if "lora" in kernels:
                measured(bench_lora(bench, name, hidden, tokens, dtype))
        if "step" in kernels:
            measured(bench_step(bench, batch, seq_len, smoke))
        print(f"batch {batch}: {len(rows)} figures so far", flush=True)
    results["targets"] = evaluate_targets(rows, device.type, smoke)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_results(results, out)
    print(f"wrote {out / 'kernels.json'} and kernels.md ({len(rows)} rows)")
    errors = [r for r in rows if r["status"] == "error"]
    for r in errors:
        print(f"  error: {r['kernel']} {r['impl']} {r['shape']}: {r['reason']}", file=sys.stderr)
    return 1 if errors else 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
