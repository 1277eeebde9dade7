"""The demo's round trip as the experiments' common baseline: `compare-emulators` for importance+fit at the demo's
2-12-2 at 0.54 of the MLP, the data owner at 1e-3, no ceiling. One place for that argument list, so an experiment
that patches the fit (kl_focus.py, simulated_tuning_kl.py) differs from the baseline only in what it patches.

    from demo_compare import run_demo_compare   # run from experiments/: `python experiments/X.py`
    sys.exit(run_demo_compare(cache, "default", 42, out / "compare", "--fit-kl-perturb", "1"))
"""
from pathlib import Path


def demo_compare_args(cache: Path, budget: str, seed: int, out: Path, *extra: str) -> list[str]:
    """The `offsite-ds` argument list (without the program name); `extra` flags go before --out."""
    return ["compare-emulators", "--cache-dir", str(cache), "--layout", "2-12-2", "--mlp-width", "0.54",
            "--builders", "importance+fit", "--no-ceiling", "--fit-budget", budget, *extra,
            "--lr", "1e-3", "--seed", str(seed), "--no-progress", "--out", str(out)]


def run_demo_compare(cache: Path, budget: str, seed: int, out: Path, *extra: str) -> int:
    """Run it in this process (after the caller's patches of offsite_ds.fitting); returns the exit code."""
    from offsite_ds.cli import main
    return main(demo_compare_args(cache, budget, seed, out, *extra))


def run_round_trip(bundle: str | Path, out: Path, precision: str, lr: float, seed: int, **extra) -> dict:
    """The demo's data owner through `bundle` (PTB train, the demo's budget), the plug-in and the four rows on the
    first 8,192 tokens of PTB valid and test; writes and returns OUT/rt.json's record (`extra` added to it)."""
    import json
    import time

    from offsite_ds.demo import DemoSettings, round_trip
    from offsite_ds.demo_assets import penn_treebank_file, smollm2_dir

    files = {s: penn_treebank_file(s) for s in ("train", "valid", "test")}
    settings = DemoSettings(fit=True, lr=lr, precision=precision, seed=seed, progress=False)
    t = time.perf_counter()
    result = round_trip(smollm2_dir(), bundle, files["train"], {"valid": files["valid"], "test": files["test"]}, out,
                        settings, log=print)
    record = {k: result[k] for k in ("rows", "tune_s", "plugin_s", "evaluate_s")}
    metrics = result["summary"].get("final_metrics")  # a patched loss's own metrics (two_emulators.py)
    record.update(precision=settings.precision, lr=lr, seed=seed, **extra,
                  **({"final_metrics": metrics} if metrics else {}), wall_s=time.perf_counter() - t)
    (out / "rt.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return record
