"""The paper's perplexity rows for one round trip: Full zero-shot, Emulator zero-shot, OT Emulator, OT Plug-in.

Each row is evaluated on the exact artifacts that crossed the boundary: the shipped bundle, the returned
package applied to it, and the package plugged into the full model (or the exported plugged-in directory).
`offsite-ds report` and `offsite-ds demo` both go through here.
"""
from __future__ import annotations

from pathlib import Path

from offsite_ds.adapter_package import AdapterPackage, load_adapter_package
from offsite_ds.bundle import load_bundle
from offsite_ds.errors import ArtifactError
from offsite_ds.manifests import BUNDLE_FORMAT, BundleManifest
from offsite_ds.evaluate import perplexity
from offsite_ds.plugin import apply_to_emulator, load_model_dir, plug_in, shipped_adapter
from offsite_ds.runtime import load_model
from offsite_ds.validation import read_manifest, read_model_config

ROWS = ("Full zero-shot", "Emulator zero-shot", "OT Emulator", "OT Plug-in")  # one round trip's rows
BASELINE_ROW = "FT"  # the owner's fine-tuned baseline, when one is evaluated beside them
# the paper's two claims: the plug-in row beats the other row of each pair
CLAIMS = {"plug-in < full zero-shot": ("OT Plug-in", "Full zero-shot"),
          "plug-in < OT emulator": ("OT Plug-in", "OT Emulator")}


def check_round_trip(model_dir: str | Path, bundle_dir: str | Path, adapter_dir: str | Path
                     ) -> tuple[BundleManifest, AdapterPackage]:
    """The package, validated against the owner's config.json, and the bundle's manifest, checked against it
    before any model loads (the bundle's weights are validated when it loads)."""
    bundle_manifest = read_manifest(bundle_dir, BUNDLE_FORMAT)
    package = load_adapter_package(adapter_dir, model_config=read_model_config(model_dir))
    if package.manifest.bundle_fingerprint != bundle_manifest.fingerprint:
        raise ArtifactError(f"{adapter_dir}: adapter was tuned on another emulator bundle than {bundle_dir}; "
                            "pass the bundle it was tuned on")
    return bundle_manifest, package


def perplexity_rows(model_dir: str | Path, bundle_dir: str | Path, adapter_dir: str | Path,
                    eval_texts: dict[str, list[str]], seq_len: int | None = None, stride: int | None = None,
                    max_tokens: int | None = None, batch_size: int = 4,
                    plugged_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Perplexity of each row on each split of `eval_texts` (models loaded one after another to bound memory).

    With `plugged_dir` the plug-in row scores that exported directory (what the owner would serve);
    without it the package is plugged into the full model in memory.
    """
    _, package = check_round_trip(model_dir, bundle_dir, adapter_dir)
    bundle = load_bundle(bundle_dir)
    tokenizer = bundle.tokenizer

    def score(model) -> dict[str, float]:
        return {split: perplexity(model, tokenizer, texts, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                                  batch_size=batch_size)
                for split, texts in eval_texts.items()}

    rows = {"Emulator zero-shot": score(bundle.model)}
    rows["OT Emulator"] = score(apply_to_emulator(bundle, package))
    del bundle
    full = load_model(model_dir)
    rows["Full zero-shot"] = score(full)
    if plugged_dir is not None:
        del full
        rows["OT Plug-in"] = score(load_model_dir(plugged_dir)[0])
    else:
        rows["OT Plug-in"] = score(plug_in(full, package, shipped=shipped_adapter(bundle_dir, package)))
    return {name: rows[name] for name in ROWS}


def claims(rows: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The paper's two claims, on every split: the plug-in beats zero-shot and the tuned emulator."""
    splits = list(rows["OT Plug-in"])
    return {claim: all(rows[a][s] < rows[b][s] for s in splits) for claim, (a, b) in CLAIMS.items()}


def format_rows(rows: dict[str, dict[str, float]], labels: dict[str, str] | None = None) -> str:
    """A markdown table, one column per split (`labels` names the columns; default: '<split> ppl')."""
    splits = list(rows["OT Plug-in"])
    labels = labels or {s: f"{s} ppl" for s in splits}
    lines = ["| setting | " + " | ".join(labels[s] for s in splits) + " |",
             "| --- |" + " ---: |" * len(splits)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[s]:.2f}" for s in splits) + " |")
    return "\n".join(lines)


def format_claims(rows: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"{claim}: {'yes' if holds else 'NO'}" for claim, holds in claims(rows).items())
