"""Compare emulator builders on one model: the same adapter, the same budget, the paper's rows for each.

With several layouts (`layouts`: each builder at each, adapter sizes included) the comparison is the owner's
privacy/utility frontier: frontier.png puts each point's OT Emulator (what the data owner reaches alone)
against its OT Plug-in, with the ceiling of each adapter size, full zero-shot and FT measured in the same run.

For every builder (`SELECT[+share][+distill]`, e.g. `uniform`, `importance`, `crash+share`, `uniform+distill`)
the owner builds the emulator on its PUBLIC calibration corpus (and distils it there when asked), the
data owner tunes the same adapter with the same budget on its corpus, the owner plugs it in, and the four
perplexity rows are scored on the data owner's valid and test splits by report.perplexity_rows (the
same evaluator as `report` and `demo`). A ceiling row tunes the same adapter blocks on the full model
(the whole middle kept); an optional FT row fine-tunes the whole model on the same tokens.

Each finished builder's result is written to OUT/<builder>/result.json and skipped on a rerun, so an
interrupted comparison resumes where it stopped. The table is written as markdown, JSON and PNG.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from offsite_ds.atomic import cached, save_figure, write_json, write_text
from offsite_ds.calibrate import DEFAULT_CALIB_TOKENS
from offsite_ds.demo import TRAINING_KEYS, DemoSettings, train_config
from offsite_ds.demo import round_trip as demo_round_trip
from offsite_ds.errors import OffsiteError
from offsite_ds.fitting import FitSettings
from offsite_ds.manifests import ModeSettings
from offsite_ds.sandwich import SELECTIONS

CEILING = "ceiling"
FT = "FT"
COLUMNS = ("Full zero-shot", "Emulator zero-shot", "OT Emulator", "OT Plug-in")


COMPARE_LR = 3e-4  # one data-owner lr for every builder (README, "The data owner's learning rate")


@dataclass
class CompareSettings(DemoSettings):
    """The demo's data-owner budget (layout, mode, steps, ...) for every builder, plus the owner's side. One lr for
    every builder (`COMPARE_LR`, at which every comparison in the README was measured), so rows compare at one
    budget; `--lr` moves it."""

    lr: float = COMPARE_LR
    layout: str = "2-8-2"  # the builders compare at the paper's layout, with whole blocks (the README's tables)
    mlp_width: float | None = None  # every builder's kept blocks narrowed (emulate --mlp-width); the tables: whole
    builders: tuple[str, ...] = ("uniform", "importance", "importance+fit", "crash", "crash+share")  # +fit: emulate's
    layouts: tuple[str, ...] = ()  # the frontier: every builder at every layout (empty: just `layout`)
    mode_settings: dict = field(default_factory=dict)  # keyword overrides of the mode's settings, as recorded
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    importance: str = "drop"
    distill_steps: int = 100
    distill_lr: float = 1e-4
    distill: dict = field(default_factory=dict)  # distill()'s loss options: kd_weight, lm_weight, kd_norm, ...
    fit: FitSettings = field(default_factory=FitSettings)  # of the +fit builders (checked when the run starts)
    ceiling: bool = True
    ft: bool = False
    ft_lr: float = 1e-4

    def tuning(self) -> ModeSettings:
        """The typed settings of `mode` that `mode_settings` asks for (checked: one line on a bad one)."""
        from offsite_ds.peft_modes import settings_for

        return settings_for(self.mode, **self.mode_settings)


def parse_builder(spec: str) -> tuple[str, bool, bool, bool]:
    """'crash+share' -> ('crash', share, fit, distill) = ('crash', True, False, False); one clear line for
    anything else. +fit trains the kept blocks to their runs (emulate --fit), +distill distils afterwards."""
    select, *flags = spec.strip().split("+")
    if select not in SELECTIONS or not set(flags) <= {"share", "fit", "distill"} or len(set(flags)) != len(flags):
        raise OffsiteError(f"builder '{spec}' is not SELECT[+share][+fit][+distill] with SELECT one of "
                           f"{', '.join(SELECTIONS)} (e.g. uniform, crash+share, iterative+fit, importance+distill)")
    if "share" in flags and select != "crash":
        raise OffsiteError(f"builder '{spec}': +share needs the crash selection (crash+share)")
    if "share" in flags and ("distill" in flags or "fit" in flags):
        raise OffsiteError(f"builder '{spec}': a shared emulator cannot be fitted or distilled; use crash+distill "
                           "or crash+share")
    return select, "share" in flags, "fit" in flags, "distill" in flags


def emulator_cost(bundle_dir: Path, mode: str, settings: ModeSettings, seq_len: int) -> dict:
    """Stored parameters of the emulator and the data owner's training FLOPs per token through it."""
    from offsite_ds.bench.flops import flops_per_token, plan_from_model
    from offsite_ds.bundle import load_bundle
    from offsite_ds.peft_modes import apply_mode

    bundle = load_bundle(bundle_dir)
    params = sum(p.numel() for p in {id(p): p for p in bundle.model.parameters()}.values())
    apply_mode(bundle.model, bundle.adapter_positions, mode, settings)
    flops = flops_per_token(plan_from_model(bundle.model), seq_len)["total"]
    return {"emulator_params": params, "tune_flops_per_token": flops}


def round_trip(model_dir: Path, bundle: Path, train_file: Path, eval_files: dict[str, Path], out: Path,
               s: CompareSettings) -> dict:
    """demo.round_trip with the comparison's adapter settings, as a result records it:
    {"rows", "tune_s", "plugin_s", "training"}; the adapter and plugged model stay under `out`."""
    trip = demo_round_trip(model_dir, bundle, train_file, eval_files, out, s, s.tuning())
    return {"rows": trip["rows"], "tune_s": trip["tune_s"], "plugin_s": trip["plugin_s"],
            "training": {k: trip["summary"].get(k) for k in TRAINING_KEYS}}


def run_builder(name: str, model_dir: Path, calib_data: Path, train_file: Path, eval_files: dict[str, Path],
                out: Path, s: CompareSettings, layout: str, log=print) -> dict:
    """Owner builds (and distils), data owner tunes, owner plugs in; the rows and the costs of one builder."""
    from offsite_ds.emulator import make_bundle
    from offsite_ds.manifests import BUNDLE_FORMAT, dump
    from offsite_ds.roles.distill import distill
    from offsite_ds.validation import read_manifest

    select, share, fitted, distilled = parse_builder("uniform" if name.startswith(CEILING) else name)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    written = make_bundle(model_dir, layout, out / "bundle", select=select, share=share, calib_data=calib_data,
                          calib_tokens=s.calib_tokens, importance=s.importance, progress=s.progress, log=log,
                          allow_far=True,  # far builders are measured here on purpose
                          fit=s.fit if fitted else None,
                          mlp_width=None if name.startswith(CEILING) else s.mlp_width)  # the ceiling: whole blocks
    bundle, manifest = written.path, written.manifest
    timings["emulate_s"] = time.perf_counter() - t
    if distilled:
        t = time.perf_counter()
        distill(model_dir, bundle, calib_data, out / "distilled",
                cfg=train_config(s, out / "distill.checkpoints", s.distill_steps, s.distill_lr, 0),
                seq_len=s.seq_len, max_train_blocks=s.distill_steps * s.batch_size, **s.distill)
        bundle = out / "distilled"
        manifest = read_manifest(bundle, BUNDLE_FORMAT)  # distillation rewrote it
        timings["distill_s"] = time.perf_counter() - t
    trip = round_trip(model_dir, bundle, train_file, eval_files, out, s)
    timings.update(tune_s=trip["tune_s"], plugin_s=trip["plugin_s"])
    return {"builder": name, "layout": layout, "rows": trip["rows"], "block_map": manifest.block_map,
            "share_map": manifest.share_map, "quality": manifest.quality and dump(manifest.quality),
            **emulator_cost(bundle, s.mode, s.tuning(), s.seq_len),
            "owner_s": timings["emulate_s"] + timings.get("distill_s", 0.0) + timings["plugin_s"],
            "data_owner_s": timings["tune_s"], "timings": timings, "training": trip["training"]}


def run_ft(model_dir: Path, train_file: Path, eval_files: dict[str, Path], out: Path, s: CompareSettings) -> dict:
    """The paper's FT row: the whole model fine-tuned on exactly the data owner's tokens and steps."""
    from offsite_ds.data import load_texts
    from offsite_ds.evaluate import perplexity
    from offsite_ds.plugin import load_model_dir
    from offsite_ds.roles.finetune_full import finetune

    t = time.perf_counter()
    finetune(model_dir, train_file, out / "model", cfg=train_config(s, out / "model.checkpoints", s.steps, s.ft_lr,
                                                                     0),
             seq_len=s.seq_len, max_train_blocks=s.steps * s.batch_size)
    seconds = time.perf_counter() - t
    model, tokenizer = load_model_dir(out / "model")
    ppl = {split: perplexity(model, tokenizer, load_texts(path), seq_len=s.eval_seq_len, max_tokens=s.eval_tokens)
           for split, path in eval_files.items()}
    return {"builder": FT, "ppl": ppl, "wall_s": seconds}


def table_rows(results: list[dict], ft: dict | None, split: str) -> list[dict]:
    """One flat row per builder for `split`: the four rows, FT, privacy gap, tuning gain, costs."""
    out = []
    for r in results:
        ppl = {name: r["rows"][name][split] for name in COLUMNS}
        quality = r.get("quality") or {}
        out.append({"builder": r["builder"], "layout": r["layout"], **ppl,
                    "public ratio": quality.get("ratio"),
                    "FT": ft["ppl"][split] if ft else None,
                    "privacy gap": ppl["OT Emulator"] - ppl["OT Plug-in"],
                    "tuning gain": ppl["Full zero-shot"] - ppl["OT Plug-in"],
                    "emulator params": r["emulator_params"], "tune FLOPs/token": r["tune_flops_per_token"],
                    "owner s": r["owner_s"], "data owner s": r["data_owner_s"]})
    return out


def format_table(rows: list[dict], split: str) -> str:
    def cell(v, millions: bool = False) -> str:
        if v is None:
            return "-"
        if millions:
            return f"{v / 1e6:.3g}M"
        return f"{v:.3g}" if abs(v) >= 1e5 else f"{v:.2f}"

    head = ["builder", "layout", "public ratio", *COLUMNS, "FT", "privacy gap", "tuning gain", "emulator params",
            "tune FLOPs/token", "owner s", "data owner s"]
    lines = [f"**{split}** perplexity (public ratio = emulator / full perplexity on the owner's calibration text; "
             "privacy gap = OT Emulator - OT Plug-in; tuning gain = Full zero-shot - OT Plug-in)", "",
             "| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in rows:
        cells = [cell(r[h], millions=h in ("emulator params", "tune FLOPs/token")) for h in head[2:]]
        lines.append(f"| {r['builder']} | {r['layout']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(rows: list[dict], split: str, path: Path) -> None:
    """The owner's privacy/utility frontier: each (layout, builder) point at x = OT Emulator (what the data owner
    reaches without the owner: further right protects the owner more) and y = OT Plug-in (lower is better),
    with the full zero-shot, ceiling and FT lines measured in the same run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [r for r in rows if not r["builder"].startswith(CEILING)]
    ax.scatter([r["OT Emulator"] for r in points], [r["OT Plug-in"] for r in points], zorder=3)
    for r in points:
        ax.annotate(f"{r['builder']} {r['layout']}", (r["OT Emulator"], r["OT Plug-in"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(rows[0]["Full zero-shot"], color="k", ls="--", lw=1, label="Full zero-shot")
    for r in rows:
        if r["builder"].startswith(CEILING):
            ax.axhline(r["OT Plug-in"], color="tab:orange", ls="-.", lw=1, label=f"{r['builder']} ({r['layout']})")
    if rows[0]["FT"] is not None:
        ax.axhline(rows[0]["FT"], color="g", ls=":", lw=1, label="FT")
    ax.set_xscale("log")
    ax.set_xlabel(f"OT Emulator {split} perplexity (log; right = the owner keeps more)")
    ax.set_ylabel(f"OT Plug-in {split} perplexity (lower = better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def ceiling_layout(bottom: int, top: int, depth: int) -> str:
    """The ceiling's layout for a bottom+top adapter: the whole middle kept, so no emulator can do better."""
    return f"{bottom}-{depth - bottom - top}-{top}"


def jobs_for(s: CompareSettings, depth: int) -> list[tuple[str, str, str]]:
    """(name, layout, folder) of every run: each builder at each layout, then one ceiling per adapter size
    (the same L+R blocks tuned on the full model). One layout keeps the single-layout folder names."""
    from offsite_ds.sandwich import Layout

    layouts = [Layout.parse(spec, depth) for spec in (s.layouts or (s.layout,))]
    single = len(layouts) == 1
    jobs, sizes = [], []
    for layout in layouts:
        for name in s.builders:
            jobs.append((name, str(layout), name.replace("+", "_") if single else f"{layout}_{name.replace('+', '_')}"))
        if (layout.bottom, layout.top) not in sizes:
            sizes.append((layout.bottom, layout.top))
    for bottom, top in sizes if s.ceiling else []:
        whole = ceiling_layout(bottom, top, depth)
        name = CEILING if len(sizes) == 1 else f"{CEILING} {bottom}+{top}"
        jobs.append((name, whole, name.replace(" ", "_").replace("+", "_")))
    return jobs


def plot(rows: list[dict], split: str, path: Path) -> None:
    """Grouped bars per builder (log scale): emulator zero-shot, OT Emulator, OT Plug-in; full and FT as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4))
    width = 0.27
    for k, name in enumerate(("Emulator zero-shot", "OT Emulator", "OT Plug-in")):
        ax.bar([i + (k - 1) * width for i in range(len(rows))], [r[name] for r in rows], width, label=name)
    ax.axhline(rows[0]["Full zero-shot"], color="k", ls="--", lw=1, label="Full zero-shot")
    if rows[0]["FT"] is not None:
        ax.axhline(rows[0]["FT"], color="g", ls=":", lw=1, label="FT")
    ax.set_xticks(range(len(rows)), [r["builder"] for r in rows], rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel(f"{split} perplexity (log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def compare_emulators(model_dir: str | Path, calib_data: str | Path, train_file: str | Path,
                      eval_files: dict[str, str | Path], out_dir: str | Path, settings: CompareSettings | None = None,
                      log=print) -> dict:
    """Run every builder (then the ceiling and FT rows) through the same budget; write the table.

    `calib_data` is the owner's public corpus (calibration and distillation); `train_file`/`eval_files`
    are the data owner's. Returns {"settings", "results", "ft", "tables"}; files in out_dir.
    """
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    s = settings or CompareSettings()
    model_dir, calib_data, train_file, out = Path(model_dir), Path(calib_data), Path(train_file), Path(out_dir)
    eval_files = {k: Path(v) for k, v in eval_files.items()}
    for what, path in [("--calib-data", calib_data), ("--train", train_file), *eval_files.items()]:
        if not path.is_file():
            raise OffsiteError(f"{what} {path}: no such file")
    if calib_data.resolve() in {train_file.resolve(), *(p.resolve() for p in eval_files.values())}:
        raise OffsiteError("--calib-data is one of the data owner's files; calibrate on the owner's public corpus")
    from offsite_ds.emulator import check_mlp_width

    for name in s.builders:  # refused here, not when a later builder's turn comes after the others have run
        check_mlp_width(s.mlp_width, calib_data, "drop", share=parse_builder(name)[1])
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    from offsite_ds.bench.shapes import depth_of_config

    depth = depth_of_config(config)
    results = []
    for name, spec_layout, folder in tqdm(jobs_for(s, depth), desc="emulator builders", disable=not s.progress):
        log(f"[compare] {name} ({spec_layout})")
        results.append(cached(out / folder, lambda n=name, lay=spec_layout, f=folder: run_builder(
            n, model_dir, calib_data, train_file, eval_files, out / f, s, lay, log)))
    ft = cached(out / "ft", lambda: run_ft(model_dir, train_file, eval_files, out / "ft", s)) if s.ft else None
    tables = {split: table_rows(results, ft, split) for split in eval_files}
    markdown = "\n\n".join(format_table(rows, split) for split, rows in tables.items())
    report = {"settings": asdict(s), "model": str(model_dir), "calib_data": str(calib_data),
              "train": str(train_file), "eval": {k: str(v) for k, v in eval_files.items()},
              "results": results, "ft": ft, "tables": tables}
    write_json(out / "compare.json", report)
    write_text(out / "compare.md", markdown + "\n")
    report_split = "test" if "test" in tables else next(iter(tables))
    plot(tables[report_split], report_split, out / "compare.png")
    plot_frontier(tables[report_split], report_split, out / "frontier.png")
    report["markdown"] = markdown
    return report


def best_builder(report: dict, split: str = "valid") -> str:
    """The builder whose plug-in scores best on `split` (choose on valid, report on test)."""
    rows = [r for r in report["tables"][split] if not r["builder"].startswith(CEILING)]
    return min(rows, key=lambda r: (r["OT Plug-in"] if math.isfinite(r["OT Plug-in"]) else math.inf))["builder"]
