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
