#!/usr/bin/env python
"""The GPU acceptance run (`bash scripts/gpu_acceptance.sh`): every GPU claim of the toolkit checked in one
command, in fresh processes with TRITON_INTERPRET unset, results under benchmarks/results/<date>-<gpu>/.

    python scripts/gpu_acceptance.py                 # on a CUDA machine: all checks (<= 20 min on one H100)
    python scripts/gpu_acceptance.py --only parity,patched
    python scripts/gpu_acceptance.py --dry-run --out /tmp/acc   # any machine: plan, metadata, summary format

Each check is a subprocess with its own time budget and log file; `summary.txt` (printed at the end) is one
screen: pass/fail per check and the headline ratios; `acceptance.json` holds the same plus the metadata
(device, driver, torch/triton/deepspeed versions, the command, the git commit). The `parity` and `patched`
checks are sub-commands of this script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
TOTAL_BUDGET_S = 20 * 60


@dataclass
class Check:
    name: str
    budget_s: int
    argv: list[str]
    expect_rc: int = 0
    expect_text: str | None = None  # must appear in the output (a refusal's message, say)
    headline: str | None = None  # file (relative to the run dir) whose "headline" entries the summary quotes
    env: dict = field(default_factory=dict)


def plan(out: Path, python: str = sys.executable) -> list[Check]:
    """The checks, in order; the work folder (tiny model, corpus, bundle) is made by the `setup` check."""
    work = out / "work"
    cli = [python, "-m", "offsite_ds"]
    train = ["--seq-len", "64", "--batch-size", "2", "--steps", "10", "--warmup", "0", "--no-progress"]
    bundle, model, corpus = str(work / "bundle"), str(work / "model"), str(work / "corpus.txt")

    def tune(tag: str, kernels: str, ds: str | None) -> list[str]:
        return [*cli, "tune", bundle, "--data", corpus, "--out", str(work / f"tune-{tag}"), "--mode", "lora",
                "--kernels", kernels, *(["--deepspeed", ds] if ds else []), *train]

    return [
        Check("setup", 60, [python, str(THIS), "setup", "--work", str(work)]),
        Check("parity", 150, [python, str(THIS), "parity", "--json", str(out / "parity.json")],
              headline="parity.json"),
        Check("patched", 150, [python, str(THIS), "patched", "--json", str(out / "patched.json")],
              headline="patched.json"),
        Check("tune-torch-kernels-on", 45, tune("torch", "on", None)),
        Check("tune-zero2-kernels-on", 60, tune("zero2", "on", "zero2")),
        Check("tune-zero3-kernels-on-refused", 30, tune("zero3-on", "on", "zero3"), expect_rc=2,
              expect_text="cannot run under ZeRO-3"),
        Check("tune-zero3-kernels-off", 60, tune("zero3", "off", "zero3")),
        Check("distill-zero3", 60, [*cli, "distill", model, "--bundle", bundle, "--data", corpus, "--out",
                                    str(work / "distilled"), "--deepspeed", "zero3", *train]),
        Check("finetune-lora-zero3", 60, [*cli, "finetune", model, "--lora", "--data", corpus, "--out",
                                          str(work / "ft-lora"), "--deepspeed", "zero3", *train]),
        Check("kernel-benchmarks", 200, [python, str(ROOT / "benchmarks" / "kernel_bench.py"), "--models",
                                         "opt-1.3b,bloom-7b1", "--batch", "1,8", "--out", str(out / "kernels")]),
        Check("efficiency-suite", 175, [*cli, "bench", "--model", "opt-1.3b", "--settings",
                                        "ft,ft-lora,ot,ot-lora,ot-lora-kernels", "--batch-size", "1,max",
                                        "--seq-len", "512", "--out", str(out / "suite")]),
        Check("pytest", 150, [python, "-m", "pytest", "-q", "-x", "-n", "8", "--dist", "loadfile", "-p",
                              "no:benchmark", str(ROOT / "tests")], env={"TRITON_INTERPRET": "1"}),
    ]


# ---------------------------------------------------------------- metadata and summary

def metadata(command: list[str]) -> dict:
    """Device, driver, versions (torch, triton, deepspeed, ...), the command and the git commit."""
    import torch

    from offsite_ds.bench.devices import describe_device
    from offsite_ds.bench.report import versions

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"date": time.strftime("%Y-%m-%d", time.gmtime()), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join(command), "device": describe_device(device).to_json(), "driver": driver,
            "versions": versions()}


def run_dir(meta: dict, out: str | None) -> Path:
    if out:
        return Path(out)
    slug = meta["device"]["name"].lower().replace(" ", "-").replace("/", "-")
    return ROOT / "benchmarks" / "results" / f"{meta['date']}-{slug}"


def run_check(check: Check, out: Path, deadline: float) -> dict:
    """Run one check in a fresh process (TRITON_INTERPRET unset unless the check sets it); log to a file."""
    budget = max(1, min(check.budget_s, int(deadline - time.time())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", **check.env)
    log = out / "logs" / f"{check.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        proc = subprocess.run(check.argv, capture_output=True, text=True, timeout=budget, env=env, cwd=ROOT)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = None, f"{exc.stdout or ''}{exc.stderr or ''}\n[timed out after {budget} s]"
    log.write_text(f"$ {' '.join(check.argv)}\n{text}")
    ok = rc == check.expect_rc and (check.expect_text is None or check.expect_text in text)
    why = "" if ok else ("timed out" if rc is None else f"exit {rc}, expected {check.expect_rc}"
                         if rc != check.expect_rc else f"output lacks '{check.expect_text}'")
    result = {"check": check.name, "status": "pass" if ok else "FAIL", "seconds": round(time.time() - start, 1),
              "why": why, "log": str(log.relative_to(out))}
    if check.headline and (out / check.headline).is_file():
        result["headline"] = json.loads((out / check.headline).read_text()).get("headline", {})
    return result


def summary(meta: dict, results: list[dict]) -> str:
    """One screen: device line, pass/fail per check with seconds, the headline ratios, the verdict."""
    lines = [f"GPU acceptance {meta['date']} on {meta['device']['name']} (driver {meta['driver']}), "
             f"torch {meta['versions'].get('torch')}, triton {meta['versions'].get('triton')}, "
             f"deepspeed {meta['versions'].get('deepspeed')}, commit {str(meta['versions'].get('git_commit'))[:12]}"]
    for r in results:
        extra = f"  ({r['why']})" if r["why"] else ""
        lines.append(f"  {r['status']:<8} {r['check']:<32} {r['seconds']:>7.1f} s{extra}")
        for key, value in r.get("headline", {}).items():
            lines.append(f"           {key}: {value}")
    failed = [r["check"] for r in results if r["status"] not in ("pass", "not run")]
    lines.append(f"{'ALL PASSED' if not failed else 'FAILED: ' + ', '.join(failed)} "
                 f"({sum(r['seconds'] for r in results):.0f} s)")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, meta: dict, results: list[dict]) -> str:
    from offsite_ds.atomic import write_json, write_text

    text = summary(meta, results)
    write_json(out / "acceptance.json", {"meta": meta, "results": results})
    write_text(out / "summary.txt", text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<date>-<gpu>/)")
    p.add_argument("--only", default=None, help="comma-separated check names")
    p.add_argument("--dry-run", action="store_true", help="write the plan, metadata and summary; run nothing")
    args = p.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_acceptance: no CUDA GPU here; this run needs one (--dry-run shows the plan)", file=sys.stderr)
            return 2
    meta = metadata(["python", "scripts/gpu_acceptance.py", *argv])
    out = run_dir(meta, args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks = plan(out)
    if args.only:
        wanted = {c.strip() for c in args.only.split(",")}
        unknown = wanted - {c.name for c in checks}
        if unknown:
            print(f"gpu_acceptance: unknown check(s) {', '.join(sorted(unknown))}; choose from "
                  f"{', '.join(c.name for c in checks)}", file=sys.stderr)
            return 2
        checks = [c for c in checks if c.name in wanted or c.name == "setup"]
    deadline = time.time() + TOTAL_BUDGET_S
    results = []
    for check in checks:
        if args.dry_run:
            results.append({"check": check.name, "status": "not run", "seconds": 0.0, "why": "dry run",
                            "argv": check.argv, "budget_s": check.budget_s})
            continue
        results.append(run_check(check, out, deadline))
        print(f"{results[-1]['status']:<8} {check.name} ({results[-1]['seconds']} s)", flush=True)
        write_outputs(out, meta, results)
    print(write_outputs(out, meta, results), end="")
    print(f"results: {out}")
    return 0 if all(r["status"] in ("pass", "not run") for r in results) else 1


# ---------------------------------------------------------------- sub-commands (each runs in its own process)

def cmd_setup(argv: list[str]) -> int:
    """A small random OPT (8 blocks, hidden 256, byte vocabulary), a corpus, and its 2-4-2 bundle."""
    p = argparse.ArgumentParser(prog="gpu_acceptance.py setup")
    p.add_argument("--work", required=True)
    args = p.parse_args(argv)
    from offsite_ds.emulator import make_bundle
    from offsite_ds.tiny import save_tiny_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model("opt", work / "model", n_layers=8, hidden=256)
    text = "the quick brown fox jumps over the lazy dog . a stitch in time saves nine . " * 400
    (work / "corpus.txt").write_text(text)
    make_bundle(model, "2-4-2", work / "bundle", select="uniform", calib_data=None)
    print(f"setup: {work}")
    return 0


def _compare(got, ref, dtype) -> float:
    """Max error relative to the reference's largest magnitude."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


def cmd_parity(argv: list[str]) -> int:
    """Compiled kernels vs fp32 references, forward and every gradient, fp32/bf16/fp16, odd shapes and the
    int64-sized ones (CE at T=8704 x V=250,880 in one chunk; a norm over 2^31 elements); each run twice and
    required to be bitwise equal."""
    p = argparse.ArgumentParser(prog="gpu_acceptance.py parity")
    p.add_argument("--json", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU (interpreter) check of this code: no int64 cases")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from offsite_ds.kernels import (bias_activation, layer_norm, linear_cross_entropy, lora_linear,
                                    reference_bias_activation, reference_lora_linear, rms_norm)
    from offsite_ds.kernels.layer_norm import reference_rms_norm

    dev = torch.device("cpu" if args.smoke else "cuda")
    rows, failures = [], []

    def check(name, dtype, fn, ref_fn, inputs):
        """fn and ref_fn map inputs -> output; gradients of every input that requires grad are compared."""
        outs = []
        for _ in range(2):
            for t in inputs:
                t.grad = None
            out = fn(*inputs)
            out.backward(torch.ones_like(out) if out.dim() else None)
            outs.append([out.detach().clone()] + [t.grad.clone() for t in inputs if t.requires_grad])
        ref_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
        ref = ref_fn(*ref_inputs)
        ref.backward(torch.ones_like(ref) if ref.dim() else None)
        want = [ref.detach()] + [t.grad for t in ref_inputs if t.requires_grad]
        errors = [_compare(g, w, dtype) for g, w in zip(outs[0], want)]
        bitwise = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
        ok = bitwise and max(errors) <= TOLERANCE[str(dtype).split(".")[-1]]
        rows.append({"case": name, "dtype": str(dtype), "max_rel_error": max(errors), "bitwise_repeatable": bitwise,
                     "ok": ok})
        if not ok:
            failures.append(name + " " + str(dtype))
        torch.cuda.empty_cache()

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator(device=dev).manual_seed(0)

        def rand(*shape, grad=True, scale=1.0):
            return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype).requires_grad_(grad)

        x = rand(3, 7, 1023)
        w, b = rand(1023, scale=0.1), rand(1023, scale=0.1)
        check("layer_norm odd", dtype, lambda x, w, b: layer_norm(x, w, b), lambda x, w, b: F.layer_norm(
            x, (1023,), w, b), [x, w, b])
        check("rms_norm odd", dtype, lambda x, w: rms_norm(x, w), lambda x, w: reference_rms_norm(x, w), [x, w])
        z, bias = rand(5, 4099), rand(4099, scale=0.1)
        for kind in ("relu", "gelu", "gelu_tanh"):
            check(f"bias_activation {kind} odd", dtype, lambda z, bias, k=kind: bias_activation(z, bias, k),
                  lambda z, bias, k=kind: reference_bias_activation(z, bias, k), [z, bias])
        h, head = rand(37, 257), rand(50272, 257, grad=False, scale=257 ** -0.5)
        y = torch.randint(0, 50272, (37,), device=dev)
        check("linear_cross_entropy odd", dtype, lambda h: linear_cross_entropy(h, head, y),
              lambda h: F.cross_entropy(F.linear(h, head.float()), y), [h])
        xl, wl = rand(37, 1023), rand(515, 1023, grad=False, scale=1023 ** -0.5)
        la = (torch.randn(8, 1023, device=dev, generator=g) * 0.03).requires_grad_(True)
        lb = (torch.randn(515, 8, device=dev, generator=g) * 0.03).requires_grad_(True)
        for gemm in ("cublas", "triton"):
            check(f"lora_linear {gemm} odd", dtype,
                  lambda x, a, b, gm=gemm: lora_linear(x, wl, None, a, b, 2.0, gemm=gm),
                  lambda x, a, b: reference_lora_linear(x, wl.float(), None, a, b, 2.0), [xl, la, lb])
    if args.smoke:
        return _write_parity(args.json, rows, failures)
    # int64-sized: CE logits of one chunk over 2^31 elements; a LayerNorm over 2^31 elements
    dtype = torch.bfloat16
    h = (torch.randn(8704, 1024, device=dev) * 0.5).to(dtype).requires_grad_(True)
    head = (torch.randn(250880, 1024, device=dev) * 1024 ** -0.5).to(dtype)
    y = torch.randint(0, 250880, (8704,), device=dev)
    check("linear_cross_entropy T=8704 V=250880 one chunk", dtype,
          lambda h: linear_cross_entropy(h, head, y, chunk_bytes=8704 * 250880 * 2),
          lambda h: torch.cat([F.cross_entropy(F.linear(c, head.float()), t, reduction="sum").reshape(1)
                               for c, t in zip(h.split(1024), y.split(1024))]).sum() / y.numel(), [h])
    del head
    x = torch.randn(2 ** 31 // 4096 + 1, 4096, device=dev, dtype=dtype).requires_grad_(True)
    out = layer_norm(x, None, None)
    ref_rows = F.layer_norm(x[-4:].float(), (4096,))
    err = _compare(out[-4:], ref_rows, dtype)
    rows.append({"case": "layer_norm over 2^31+ elements (last rows)", "dtype": str(dtype), "max_rel_error": err,
                 "ok": err <= TOLERANCE["bfloat16"]})
    if not rows[-1]["ok"]:
        failures.append(rows[-1]["case"])
    return _write_parity(args.json, rows, failures)


def _write_parity(path: str, rows: list[dict], failures: list[str]) -> int:
    from offsite_ds.atomic import write_json

    headline = {"parity cases": f"{sum(r['ok'] for r in rows)}/{len(rows)} within tolerance and bitwise repeatable"}
    write_json(path, {"rows": rows, "failures": failures, "headline": headline})
    print("\n".join(f"{'ok ' if r['ok'] else 'BAD'} {r['case']} {r['dtype']} {r['max_rel_error']:.2e}" for r in rows))
    return 1 if failures else 0


def cmd_patched(argv: list[str]) -> int:
    """Patched vs unpatched tiny OPT/BLOOM/GPT-2/Llama emulators and an OPT-1.3B-shaped 2-8-2 emulator,
    50 steps, fp32 weights + bf16 autocast and all-bf16: final losses within tolerance; which kernels swapped."""
    p = argparse.ArgumentParser(prog="gpu_acceptance.py patched")
    p.add_argument("--json", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="CPU (interpreter) check of this code: tiny models only")
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from offsite_ds.atomic import write_json
    from offsite_ds.emulator import build_emulator
    from offsite_ds.kernels import PARTS, patch
    from offsite_ds.paper_models import paper_config
    from offsite_ds.peft_modes import apply_mode
    from offsite_ds.sandwich import emulator_adapter_positions, parse_layout
    from offsite_ds.tiny import tiny_model

    dev = torch.device("cpu" if args.smoke else "cuda")
    rows, failures = [], []

    def model_for(name):
        if name == "opt-1.3b-2-8-2":
            config = paper_config("opt-1.3b")
            config.num_hidden_layers = 12  # the 2-8-2 emulator's blocks at OPT-1.3B's shapes
            full = AutoModelForCausalLM.from_config(config)
            return full, parse_layout("2-8-2", 12)
        return tiny_model(name, n_layers=6), parse_layout("1-2-1", 6)

    for name in ("opt", "bloom", "gpt2", "llama") + (() if args.smoke else ("opt-1.3b-2-8-2",)):
        for precision in ("fp32+autocast", "bf16"):
            losses = {}
            swapped = None
            for kernels in (False, True):
                torch.manual_seed(0)
                full, layout = model_for(name)
                emu, _ = build_emulator(full, layout)
                apply_mode(emu, emulator_adapter_positions(layout), "lora")
                emu = emu.to(dev, torch.bfloat16 if precision == "bf16" else torch.float32).train()
                if kernels:
                    swapped = sorted(set(patch(emu, PARTS).swapped.values()))
                params = [q for q in emu.parameters() if q.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-4)
                gen = torch.Generator(device=dev).manual_seed(1)
                history = []
                for _ in range(args.steps):
                    ids = torch.randint(0, emu.config.vocab_size, (2, 32 if args.smoke else 256), device=dev,
                                        generator=gen)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision != "bf16"):
                        loss = emu(input_ids=ids, labels=ids).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    history.append(float(loss.detach()))
                losses[kernels] = history
                del emu, full, opt
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            worst = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(losses[False], losses[True]))
            ok = worst <= 2e-2
            rows.append({"model": name, "precision": precision, "max_rel_loss_diff": worst, "swapped": swapped,
                         "ok": ok})
            if not ok:
                failures.append(f"{name} {precision}")
    headline = {"patched vs unpatched": f"{sum(r['ok'] for r in rows)}/{len(rows)} within 2% over {args.steps} steps"}
    write_json(args.json, {"rows": rows, "failures": failures, "headline": headline})
    print("\n".join(f"{'ok ' if r['ok'] else 'BAD'} {r['model']} {r['precision']} {r['max_rel_loss_diff']:.2e} "
                    f"{r['swapped']}" for r in rows))
    return 1 if failures else 0


SUBCOMMANDS = {"setup": cmd_setup, "parity": cmd_parity, "patched": cmd_patched}

if __name__ == "__main__":
    sys.exit(main())
