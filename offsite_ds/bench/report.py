"""Benchmark output: results.json (everything), results.md (table with ratios against FT of the same run,
the paper's Table 6 ratios beside) and plot.png (throughput, memory, ratios). Every file is written
atomically (temp file in the same folder, then a rename).
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import torch

from offsite_ds.atomic import save_figure, utc_stamp, write_json

FORMAT = "offsite-ds-bench"
FORMAT_VERSION = 1

# Offsite-Tuning (Xiao et al. 2023), Table 6: one NVIDIA A6000, batch 1, block 512; tokens/s and MB.
PAPER_TABLE6 = {
    "opt-1.3b": {"layout": "2-8-2", "rows": {"FT": (1316, 30458), "FT+LoRA": (3379, 12470),
                                             "OT": (5207, 9336), "OT+LoRA": (8525, 6192)}},
    "gpt2-xl": {"layout": "2-16-2", "rows": {"FT": (957, 39922), "FT+LoRA": (1992, 17113),
                                             "OT": (4905, 8966), "OT+LoRA": (6257, 7155)}},
}
PAPER_SETTING = "Offsite-Tuning Table 6: one NVIDIA A6000, batch 1, block 512"
# issue 5's target, measured in one run on one GPU
TARGET = {"model": "opt-1.3b", "layout": "2-8-2", "setting": "ot-lora-kernels", "speedup": 10.0,
          "memory_reduction": 8.0, "emulator_mfu": 0.45}
METHOD = {
    "tokens_per_s": "steady state: batch x seq_len tokens per optimizer step over the measured steps after "
                    "the warm-up steps, each step timed between CUDA synchronisations, through the toolkit's "
                    "training loop (host-to-device copy, forward, backward, clipping, AdamW, LR schedule)",
    "memory": "torch.cuda.max_memory_allocated / max_memory_reserved (MiB, reported as MB), peak reset after "
              "the model is on the device; null on CPU",
    "flops": "offsite_ds.bench.flops: matmul FLOPs per token, 2N forward + 2N input gradients where a gradient "
             "must flow + 2N weight gradients where trainable; attention 4*width*(s+1)/2 forward, twice that "
             "backward",
    "mfu": "flops_per_token x tokens_per_s / the device's dense bf16 peak (see device.peak_source)",
}


def write_json_atomic(path: Path, obj) -> None:
    write_json(path, obj)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


COMMIT_ENV = "OFFSITE_DS_COMMIT"  # the commit, for machines without git (the lent GPU gets a copy, no .git)


def _git_commit() -> str | None:
    """HEAD (+dirty) of the checkout; where git or .git is missing, what COMMIT_ENV says (else None)."""
    given = os.environ.get(COMMIT_ENV) or None
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return given
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return given


def versions() -> dict:
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for name in ("transformers", "deepspeed", "peft", "triton", "offsite-ds"):
        out[name] = _package_version(name)
    out["git_commit"] = _git_commit()
    return out


def new_results(spec, device: torch.device, command: str | None, isolate: bool) -> dict:
    from offsite_ds.bench.devices import describe_device

    now = time.gmtime()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "status": "running",
        "date": time.strftime("%Y-%m-%d", now), "started": utc_stamp(now),
        "command": command, "device": describe_device(device, spec.peak_tflops).to_json(),
        "versions": versions(), "spec": dataclasses.asdict(spec),
        "isolation": "one process per case" if isolate else "one process",
        "shapes": ("tiny (CPU smoke test: not comparable to the paper)" if spec.smoke
                   else "real configs, random weights"),
        "method": METHOD, "paper_table6": {"setting": PAPER_SETTING, **PAPER_TABLE6}, "runs": [],
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


RESULTS_ROOT = Path("benchmarks") / "results"


def results_folder_name(date: str, device: dict, smoke: bool = False) -> str:
    """The one naming rule of a measurement folder under benchmarks/results/ (the bench, the kernel
    benchmarks and the GPU acceptance run all use it): `<date>-<gpu>` such as `2026-11-20-h200` (the
    vendor prefix dropped), `<date>-cpu` on a CPU, `-smoke` appended for tiny shapes."""
    name = "cpu" if device["type"] == "cpu" else _slug(device["name"].removeprefix("NVIDIA "))
    return f"{date}-{name}{'-smoke' if smoke else ''}"


def default_out_dir(results: dict) -> Path:
    return RESULTS_ROOT / results_folder_name(results["date"], results["device"], bool(results["spec"].get("smoke")))


# ---------------------------------------------------------------------------------------- the table

def _groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["seq_len"], str(r["batch"])), []).append(r)
    return groups


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(group: list[dict]) -> dict[str, dict[str, float | None]]:
    """Speed-up and memory reduction of each setting against FT measured in the same group."""
    ft = next((r for r in group if r["setting"] == "ft" and r["status"] == "ok"), None)
    out = {}
    for r in group:
        ok = r["status"] == "ok" and ft is not None
        out[r["setting"]] = {
            "speedup": _ratio(r.get("tokens_per_s"), ft.get("tokens_per_s")) if ok else None,
            "memory_reduction": _ratio(ft.get("peak_allocated_mb"), r.get("peak_allocated_mb")) if ok else None,
        }
    return out


def paper_ratios(model: str, paper_row: str | None) -> dict[str, float] | None:
    entry = PAPER_TABLE6.get(model.removesuffix(" (tiny)"))
    if entry is None or paper_row not in entry["rows"]:
        return None
    tput, mem = entry["rows"][paper_row]
    ft_tput, ft_mem = entry["rows"]["FT"]
    return {"speedup": tput / ft_tput, "memory_reduction": ft_mem / mem, "tokens_per_s": tput, "memory_mb": mem}


def target_check(model: str, group: list[dict], device_type: str) -> str | None:
    """One line on issue 5's target (OT+LoRA+kernels vs FT on OPT-1.3B 2-8-2), with the gap when missed."""
    if model != TARGET["model"]:
        return None
    head = (f"Target: {TARGET['setting']} >= {TARGET['speedup']:.0f}x FT tokens/s, "
            f">= {TARGET['memory_reduction']:.0f}x less peak memory, "
            f"emulator-loop MFU >= {100 * TARGET['emulator_mfu']:.0f}%")
    if device_type != "cuda":
        return head + ": not assessed (CPU run)."
    rel = ratios(group)
    run = next((r for r in group if r["setting"] == TARGET["setting"]), None)
    if run is None or run["status"] != "ok" or rel[run["setting"]]["speedup"] is None:
        return head + ": not assessed (the kernels setting or FT did not run in this group)."
    if run.get("layout") != TARGET["layout"]:
        return head + f": not assessed (layout {run.get('layout')}, the target is {TARGET['layout']})."
    parts = []
    for key in ("speedup", "memory_reduction"):
        got, want = rel[run["setting"]][key], TARGET[key]
        if got is None:
            parts.append(f"{key.replace('_', ' ')}: no figure")
            continue
        verdict = "met" if got >= want else f"missed by {want - got:.2f}x, {100 * got / want:.0f}% of the target"
        parts.append(f"{key.replace('_', ' ')} {got:.2f}x ({verdict})")
    mfus = [r["mfu"] for r in group if r["status"] == "ok" and r["setting"].startswith("ot") and r.get("mfu")]
    if mfus:
        best = max(mfus)
        parts.append(f"best emulator-loop MFU {100 * best:.1f}% ("
                     + ("met" if best >= TARGET["emulator_mfu"] else
                        f"missed by {100 * (TARGET['emulator_mfu'] - best):.1f} points") + ")")
    return head + ": " + "; ".join(parts) + "."


def _x(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _num(value, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown(results: dict) -> str:
    from offsite_ds.bench.settings import SETTINGS

    dev = results["device"]
    lines = [f"# Efficiency benchmark: {dev['name']} ({dev['type']})", ""]
    if results["spec"].get("smoke"):
        lines += ["**CPU smoke run on tiny shapes** (hidden 32, vocab 258, the real depth): it shows that every "
                  "setting runs; its numbers are not comparable to the paper or to any GPU run.", ""]
    peak = dev["peak_source"]
    if dev.get("peak_tflops"):
        peak = f"{dev['peak_tflops']} TFLOP/s dense bf16 ({dev['peak_source']})"
    spec = results["spec"]
    lines += [f"- date: {results['date']}; status: {results['status']}; shapes: {results['shapes']}",
              f"- command: `{results.get('command') or '(Python API)'}`",
              f"- MFU peak: {peak}",
              f"- steps: {spec['warmup']} warm-up + {spec['steps']} measured; master weights {spec['weights']}, "
              f"compute {'bf16 autocast' if dev['type'] == 'cuda' else 'fp32'}; LoRA r={spec['lora_r']}, "
              f"alpha={spec['lora_alpha']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v),
              f"- paper columns: ratios from {PAPER_SETTING} (tokens/s and MB there)", ""]
    header = ("| setting | layout | batch | tokens/s | speed-up vs FT | peak alloc. MB | memory reduction vs FT "
              "| peak reserved MB | trainable | resident | MFU | paper speed-up | paper memory reduction |")
    for (model, seq_len, batch), group in _groups(results["runs"]).items():
        lines += [f"## {model}, sequence {seq_len}, batch {batch}", "", header, "|" + " --- |" * 13]
        rel = ratios(group)
        for r in group:
            paper = paper_ratios(model, SETTINGS[r["setting"]].paper_row)
            status = r["status"]
            if status != "ok":
                reason = (r.get("reason") or "").replace("|", "/")
                lines.append(f"| {r['label']} | {r.get('layout') or '-'} | {r['batch_size']} | "
                             f"**{status.upper()}** {reason[:160]} | | | | | | | | "
                             f"{_x(paper and paper['speedup'])} | {_x(paper and paper['memory_reduction'])} |")
                continue
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            lines.append(
                f"| {r['label']} | {r.get('layout') or '-'} | {r['batch_size']} | {_num(r['tokens_per_s'])} | "
                f"{_x(rel[r['setting']]['speedup'])} | {_num(r.get('peak_allocated_mb'))} | "
                f"{_x(rel[r['setting']]['memory_reduction'])} | {_num(r.get('peak_reserved_mb'))} | "
                f"{_params(r.get('trainable_params'))} | {_params(r.get('resident_params'))} | {mfu} | "
                f"{_x(paper and paper['speedup'])} | {_x(paper and paper['memory_reduction'])} |")
        check = target_check(model.removesuffix(" (tiny)"), group, dev["type"])
        if check:
            lines += ["", check]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the plot

def plot_png(results: dict, path: Path) -> None:
    """Per group: tokens/s, peak memory, and measured vs paper ratios against FT (matplotlib, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from offsite_ds.bench.settings import SETTINGS

    groups = list(_groups(results["runs"]).items()) or [(("no runs", 0, "-"), [])]
    fig = Figure(figsize=(17, 3.6 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 3, squeeze=False)
    for row, ((model, seq_len, batch), group) in enumerate(groups):
        labels = [r.get("label", r.get("setting", "?")) for r in group]
        tput = [r.get("tokens_per_s") or 0 for r in group]
        mem = [r.get("peak_allocated_mb") or 0 for r in group]
        ax_t, ax_m, ax_r = axes[row]
        ax_t.barh(labels, tput, color="tab:blue")
        ax_t.set_title(f"{model}, seq {seq_len}, batch {batch}: tokens/s")
        ax_m.barh(labels, mem, color="tab:orange")
        ax_m.set_title("peak allocated MB" + (" (no CUDA memory stats on CPU)" if not any(mem) else ""))
        for ax, values in ((ax_t, tput), (ax_m, mem)):
            ax.invert_yaxis()
            for i, (r, v) in enumerate(zip(group, values)):
                text = (f"{v:,.0f}" if v else "n/a") if r["status"] == "ok" else r["status"].upper()
                ax.text(v, i, " " + text, va="center", fontsize=8)
        rel = ratios(group)
        names, bars = [], {"speed-up (this run)": [], "memory reduction (this run)": [],
                           "speed-up (paper)": [], "memory reduction (paper)": []}
        for r in group:
            paper = paper_ratios(model, SETTINGS[r["setting"]].paper_row) or {}
            names.append(r.get("label", r["setting"]))
            bars["speed-up (this run)"].append(rel[r["setting"]]["speedup"] or 0)
            bars["memory reduction (this run)"].append(rel[r["setting"]]["memory_reduction"] or 0)
            bars["speed-up (paper)"].append(paper.get("speedup", 0))
            bars["memory reduction (paper)"].append(paper.get("memory_reduction", 0))
        width = 0.2
        for k, (name, values) in enumerate(bars.items()):
            ax_r.barh([i + (k - 1.5) * width for i in range(len(names))], values, height=width, label=name,
                      color=("tab:blue", "tab:orange", "lightsteelblue", "navajowhite")[k])
        ax_r.set_yticks(range(len(names)), names)
        ax_r.invert_yaxis()
        ax_r.axvline(1.0, color="grey", lw=0.8)
        ax_r.set_title("vs FT: this run, and paper Table 6")
        ax_r.legend(fontsize=7, loc="best")
    title = f"offsite-ds bench on {results['device']['name']} ({results['date']})"
    if results["spec"].get("smoke"):
        title += " - CPU smoke run, tiny shapes: not comparable to the paper"
    fig.suptitle(title)
    save_figure(fig, path, dpi=90)


def annotate_ratios(results: dict) -> None:
    """Store each run's speed-up and memory reduction against FT of its group, and the paper's, in the JSON."""
    from offsite_ds.bench.settings import SETTINGS

    for (model, _, _), group in _groups(results["runs"]).items():
        rel = ratios(group)
        for r in group:
            r["vs_ft"] = rel[r["setting"]]
            r["paper_vs_ft"] = paper_ratios(model, SETTINGS[r["setting"]].paper_row)


def write_report(results: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    annotate_ratios(results)
    write_json_atomic(out / "results.json", results)
    _write_bytes_atomic(out / "results.md", markdown(results).encode())
    plot_png(results, out / "plot.png")
