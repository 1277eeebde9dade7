"""The paper's Tables 1-2 for one round trip: five rows evaluated through lm-eval, one markdown table.

Rows: Full zero-shot (the owner's model), Emulator zero-shot (the shipped bundle as it was shipped), FT
(an optional fully fine-tuned baseline), OT Emulator (that same bundle carrying the returned adapter)
and OT Plug-in (the adapter plugged into the full model). Each row's model is built from the artifacts
that crossed the boundary, evaluated, written to its own JSON and freed before the next one is loaded.
Under the table: the privacy gap (Plug-in - OT Emulator) and the tuning gain (Plug-in - Full zero-shot).
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offsite_ds.atomic import write_json, write_text
from offsite_ds.adapter_package import AdapterPackage
from offsite_ds.bundle import load_bundle
from offsite_ds.errors import OffsiteError
from offsite_ds.manifests import BundleManifest
from offsite_ds.lm_eval_bridge import load_tasks, place_model, run_tasks
from offsite_ds.report import BASELINE_ROW, CLAIMS, check_round_trip
from offsite_ds.report import ROWS as ROUND_TRIP_ROWS

ROWS = (*ROUND_TRIP_ROWS[:2], BASELINE_ROW, *ROUND_TRIP_ROWS[2:])  # the paper's order
ROW_FILES = {row: row.lower().replace(" ", "_").replace("-", "_") + ".json" for row in ROWS}
PRIVACY_GAP = "Privacy gap (Plug-in − OT Emulator)"
TUNING_GAIN = "Tuning gain (Plug-in − Full zero-shot)"
# each gap is one of the paper's claims (report.CLAIMS), with the sentence the table states it in
GAPS = {PRIVACY_GAP: (CLAIMS["plug-in < OT emulator"], "plug-in beats the tuned emulator (privacy)"),
        TUNING_GAIN: (CLAIMS["plug-in < full zero-shot"], "plug-in beats full zero-shot (tuning helps)")}
PAPER_NAMES = {"openbookqa": "OpenBookQA", "piqa": "PIQA", "arc_easy": "ARC-E", "arc_challenge": "ARC-C",
               "hellaswag": "HellaSwag", "sciq": "SciQ", "webqs": "WebQs", "race": "RACE", "wikitext": "WikiText"}
COMPRESSION_NAMES = {"drop": "Layer-drop", "prune": "Prune", "quantize": "Quantize"}
PPL_COLUMN = "ppl"


@dataclass
class EvalOptions:
    """What every row is evaluated on, and how."""

    tasks: list[str] = field(default_factory=list)
    include_path: list[str] | None = None
    limit: int | float | None = None
    batch_size: int = 1
    num_fewshot: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    ppl_data: str | None = None
    text_field: str = "text"
    seq_len: int | None = None
    max_tokens: int | None = None


def evaluate_model(model: torch.nn.Module, tokenizer, options: EvalOptions, tasks: dict | None = None,
                   texts: list[str] | None = None) -> dict:
    """One row: lm-eval tasks (already loaded) and perplexity on `texts`, on the requested device/dtype."""
    from offsite_ds.evaluate import perplexity

    model = place_model(model, options.device, options.dtype, options.device_map)
    start = time.time()
    row = {"tasks": run_tasks(model, tokenizer, tasks, limit=options.limit, batch_size=options.batch_size,
                              num_fewshot=options.num_fewshot) if tasks else {}}
    if texts is not None:
        row["perplexity"] = perplexity(model, tokenizer, texts, seq_len=options.seq_len,
                                       max_tokens=options.max_tokens, batch_size=max(1, options.batch_size))
    row["seconds"] = round(time.time() - start, 2)
    row["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return row


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def row_models(model_dir: str | Path, bundle_dir: str | Path, package: AdapterPackage,
               ft_dir: str | Path | None = None) -> Iterator[tuple[str, Callable[[], tuple]]]:
    """(row, build) in evaluation order; each build returns a fresh (model, tokenizer).

    The emulator rows load the bundle itself (validated, as the data owner got it); the OT rows apply the
    returned package with the plug-in's own validation. Every row loads afresh, because evaluation may
    cast a model to bf16 and a package is only applied to the fp32 weights it was checked against.
    """
    from transformers import AutoTokenizer

    from offsite_ds.runtime import load_model
    from offsite_ds.plugin import apply_to_emulator, load_model_dir, plug_in, shipped_adapter

    def emulator():
        bundle = load_bundle(bundle_dir)
        return bundle.model, bundle.tokenizer

    def ot_emulator():
        bundle = load_bundle(bundle_dir)
        return apply_to_emulator(bundle, package), bundle.tokenizer

    def full():
        return load_model(model_dir), AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def plugged():
        model, tokenizer = full()
        return plug_in(model, package, shipped=shipped_adapter(bundle_dir, package)), tokenizer

    yield "Emulator zero-shot", emulator
    yield "OT Emulator", ot_emulator
    yield "OT Plug-in", plugged  # before Full zero-shot: a package that does not fit the model fails early
    yield "Full zero-shot", full
    if ft_dir is not None:
        yield BASELINE_ROW, lambda: load_model_dir(ft_dir)


def eval_table(model_dir: str | Path, bundle_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
               options: EvalOptions, ft_dir: str | Path | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Evaluate every row, write out_dir/<row>.json as each finishes, then table.json and table.md."""
    from offsite_ds.data import load_texts

    if not options.tasks and options.ppl_data is None:
        raise OffsiteError("nothing to evaluate: pass --tasks NAME[,NAME...] and/or --ppl-data FILE")
    bundle_manifest, package = check_round_trip(model_dir, bundle_dir, adapter_dir)
    tasks = load_tasks(options.tasks, options.include_path) if options.tasks else None
    texts = load_texts(options.ppl_data, options.text_field) if options.ppl_data is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, build in row_models(model_dir, bundle_dir, package, ft_dir):
        log(f"[eval-table] {name}: loading")
        model, tokenizer = build()
        rows[name] = {"row": name, **evaluate_model(model, tokenizer, options, tasks, texts),
                      "options": asdict(options)}
        del model, tokenizer
        _free_memory()
        write_json(out / ROW_FILES[name], rows[name])
        log(f"[eval-table] {name}: done in {rows[name]['seconds']:.1f}s -> {out / ROW_FILES[name]}")
    table = build_table(rows, title=table_title(model_dir, bundle_manifest), options=options)
    write_json(out / "table.json", table)
    markdown = format_table(table)
    write_text(out / "table.md", markdown + "\n")
    return table


def table_title(model_dir: str | Path, bundle_manifest: BundleManifest) -> str:
    """'<model> (<L-K-R> <compression>)' as the paper heads each block of rows."""
    compression = bundle_manifest.compression
    method = "Distill" if compression.distilled else COMPRESSION_NAMES.get(compression.method, compression.method)
    return f"{Path(model_dir).resolve().name} ({bundle_manifest.layout} {method})"


def build_table(rows: dict[str, dict], title: str, options: EvalOptions | None = None) -> dict:
    """Rows x columns of headline numbers plus the two gaps, as plain data (table.json)."""
    ordered = [r for r in ROWS if r in rows]
    columns = []
    task_names = list(dict.fromkeys(t for r in ordered for t in rows[r].get("tasks", {})))
    for task in task_names:
        first = next(rows[r]["tasks"][task] for r in ordered if task in rows[r]["tasks"])
        values = [rows[r]["tasks"].get(task, {}).get("value") for r in ordered]
        percent = bool(first.get("higher_is_better")) and all(v is None or 0.0 <= v <= 1.0 for v in values)
        columns.append({"key": task, "label": PAPER_NAMES.get(task, task), "metric": first["metric"],
                        "higher_is_better": first.get("higher_is_better"), "percent": percent,
                        "n_samples": first.get("n_samples"), "n_docs": first.get("n_docs")})
    if any("perplexity" in rows[r] for r in ordered):
        label = f"PPL {Path(options.ppl_data).name}" if options and options.ppl_data else "PPL"
        columns.append({"key": PPL_COLUMN, "label": label, "metric": "token perplexity", "higher_is_better": False,
                        "percent": False, "n_samples": None, "n_docs": None})

    def value(row: str, key: str):
        data = rows.get(row, {})
        return data.get("perplexity") if key == PPL_COLUMN else data.get("tasks", {}).get(key, {}).get("value")

    grid = {r: {c["key"]: value(r, c["key"]) for c in columns} for r in ordered}
    stderr = {r: {c["key"]: rows[r].get("tasks", {}).get(c["key"], {}).get("stderr", {}).get(c["metric"])
                  for c in columns} for r in ordered}
    gaps = {}
    for gap, ((a, b), _) in GAPS.items():
        if a in grid and b in grid:
            gaps[gap] = {c["key"]: None if grid[a][c["key"]] is None or grid[b][c["key"]] is None
                         else grid[a][c["key"]] - grid[b][c["key"]] for c in columns}
    return {"title": title, "columns": columns, "rows": grid, "stderr": stderr, "gaps": gaps,
            "options": asdict(options) if options else None}


def _cell(value, column: dict) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if column["percent"] else f"{value:.2f}"


def _gap_cell(value, column: dict) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f} pp" if column["percent"] else f"{value:+.2f}"


def _better(a, b, column: dict) -> bool:
    return a > b if column["higher_is_better"] else a < b


def format_table(table: dict) -> str:
    """Markdown laid out like the paper's Tables 1-2, the gaps under the rows, and what was measured."""
    columns = table["columns"]
    lines = ["| Setting | " + " | ".join(c["label"] + ("" if c["higher_is_better"] else " (↓)") for c in columns) + " |",
             "| --- |" + " ---: |" * len(columns),
             f"| **{table['title']}** |" + " |" * len(columns)]
    for row, values in table["rows"].items():
        lines.append(f"| {row} | " + " | ".join(_cell(values[c['key']], c) for c in columns) + " |")
    for gap, values in table["gaps"].items():
        lines.append(f"| *{gap}* | " + " | ".join(_gap_cell(values[c['key']], c) for c in columns) + " |")
    lines.append("")
    measured = []
    for c in columns:
        n = f", {c['n_samples']} of {c['n_docs']} examples" if c.get("n_samples") is not None else ""
        measured.append(f"{c['label']}: {c['metric']}{n}")
    lines.append("Metrics: " + "; ".join(measured) + ". pp = percentage points; (↓) lower is better.")
    spread = [(e, c) for r in table.get("stderr", {}).values() for c in columns
              if c["percent"] and isinstance(e := r.get(c["key"]), (int, float))]
    if spread:
        worst = max(e for e, _ in spread)
        lines.append(f"Standard error of an accuracy above (lm-eval): up to ±{100 * worst:.1f} pp; "
                     "gaps smaller than about twice that are noise.")
    rows = table["rows"]
    for (a, b), claim in GAPS.values():
        if a in rows and b in rows:
            pairs = [(rows[a][c["key"]], rows[b][c["key"]], c) for c in columns]
            pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
            wins = sum(_better(x, y, c) for x, y, c in pairs)
            lines.append(f"{claim}: {wins} of {len(pairs)} columns")
    return "\n".join(lines)
