"""The paper's perplexity rows for one round trip: Full zero-shot, Emulator zero-shot, OT Emulator, OT Plug-in.

Each row is evaluated on the exact artifacts that crossed the boundary: the shipped bundle, the returned
package applied to it, and the package plugged into the full model.
"""
from __future__ import annotations

from pathlib import Path

from offsite_ds.bundle import load_adapter_package, load_bundle
from offsite_ds.emulator import load_owner_model
from offsite_ds.evaluate import perplexity
from offsite_ds.plugin import apply_to_emulator, plug_in

ROWS = ("Full zero-shot", "Emulator zero-shot", "OT Emulator", "OT Plug-in")


def perplexity_rows(model_dir: str | Path, bundle_dir: str | Path, adapter_dir: str | Path, texts: list[str],
                    seq_len: int | None = None, stride: int | None = None, max_tokens: int | None = None,
                    batch_size: int = 4) -> dict[str, float]:
    """Perplexity of each of the four rows on `texts` (models loaded one after another to bound memory)."""
    package = load_adapter_package(adapter_dir)
    bundle = load_bundle(bundle_dir)
    tokenizer = bundle.tokenizer
    kw = {"seq_len": seq_len, "stride": stride, "max_tokens": max_tokens, "batch_size": batch_size}
    rows = {"Emulator zero-shot": perplexity(bundle.model, tokenizer, texts, **kw)}
    rows["OT Emulator"] = perplexity(apply_to_emulator(bundle, package), tokenizer, texts, **kw)
    del bundle
    full = load_owner_model(model_dir)
    rows["Full zero-shot"] = perplexity(full, tokenizer, texts, **kw)
    rows["OT Plug-in"] = perplexity(plug_in(full, package), tokenizer, texts, **kw)
    return {name: rows[name] for name in ROWS}


def format_rows(rows: dict[str, float], title: str = "perplexity") -> str:
    """A markdown table; the two claims of the paper are checked and shown under it."""
    lines = [f"| setting | {title} |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.2f} |" for name, value in rows.items()]
    if all(k in rows for k in ROWS):
        plug = rows["OT Plug-in"]
        lines.append("")
        lines.append(f"plug-in beats zero-shot: {'yes' if plug < rows['Full zero-shot'] else 'NO'} "
                     f"({plug:.2f} vs {rows['Full zero-shot']:.2f}); plug-in beats the tuned emulator: "
                     f"{'yes' if plug < rows['OT Emulator'] else 'NO'} ({plug:.2f} vs {rows['OT Emulator']:.2f})")
    return "\n".join(lines)
