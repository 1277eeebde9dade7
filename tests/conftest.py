"""Test environment: offline, CPU, Triton in interpreter mode; tiny random models of each family.

The environment variables are set here, before anything imports triton, deepspeed or transformers.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FAMILIES = ("opt", "bloom", "gpt2", "llama")
ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """A repository script (`benchmarks/x.py`, `scripts/x.py`) as a module, registered as `script_x`
    (dataclasses look their module up; a plain `kernels` name would shadow the kernels package)."""
    import importlib.util
    import sys

    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

# The test tiers (markers registered in pytest.ini), by file: the one place that says which tier a file is in.
# A file not named here is `unit`. The fast local tier is `-m "not multirank and not slow and not gpu"`.
TIERS = {
    "multirank": {"test_ds_multirank.py"},
    "gpu": {"test_gpu_acceptance.py"},
    "slow": {"test_install.py", "test_demo_assets.py", "test_compile_gate.py", "test_fuzz_artifacts.py"},
    "integration": {"test_round_trip.py", "test_artifacts.py", "test_streaming.py", "test_resume.py", "test_demo.py",
                    "test_distill_curve.py", "test_emulator_builders.py", "test_lm_eval_table.py",
                    "test_kernels_patch.py", "test_ds_roles.py", "test_bench_suite.py", "test_cli_errors.py"},
}


def tier_of(filename: str) -> str:
    return next((tier for tier, files in TIERS.items() if filename in files), "unit")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its file's tier; a test skipped without CUDA is also `gpu`."""
    for item in items:
        item.add_marker(tier_of(item.path.name))
        skip = item.get_closest_marker("skipif")
        if skip is not None and "cuda" in str(skip.kwargs.get("reason", "")).lower():
            item.add_marker("gpu")


CORPUS = (
    "the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
    "all that glitters is not gold . the early bird catches the worm . "
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Return a function family -> directory of a saved tiny random model (8 blocks), built once."""
    from offsite_ds.tiny import save_tiny_model

    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny_model(family, tmp_path_factory.mktemp(f"tiny_{family}"), n_layers=8)
        return cache[family]

    return make


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small repetitive text corpus (learnable quickly by a tiny model)."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(CORPUS for _ in range(40)))
    return path



@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir, tmp_path_factory):
    """Return a function (family, layout="2-2-2") -> the uniform EmulatorBundle of that tiny model, built once.

    Shared by every test that only reads a bundle (tunes through it, loads it, validates it); a test that
    edits one copies it first (shutil.copytree), so the next test still gets what make_bundle wrote.
    """
    from offsite_ds.emulator import make_bundle

    cache: dict[tuple[str, str], Path] = {}

    def make(family: str = "opt", layout: str = "2-2-2") -> Path:
        if (family, layout) not in cache:
            out = tmp_path_factory.mktemp(f"bundle_{family}_{layout}") / "bundle"
            cache[family, layout] = make_bundle(tiny_model_dir(family), layout, out, select="uniform",
                                                calib_data=None).path
        return cache[family, layout]

    return make


@pytest.fixture(scope="session")
def tiny_round_trip(tiny_model_dir, tiny_bundle, corpus_file, tmp_path_factory) -> dict:
    """The tiny OPT round trip, built once: the 2-2-2 bundle, an adapter tuned through it (full mode, 3 steps
    that lower the loss) and the plugged-in model exported as a plain HF dir.

    {"model", "bundle", "adapter", "plugged", "corpus"}; read only (copy an artifact to edit it).
    """
    from offsite_ds.plugin import plugin
    from offsite_ds.roles.tune_adapter import tune
    from offsite_ds.train import TrainConfig

    root = tmp_path_factory.mktemp("round_trip")
    model_dir, bundle = tiny_model_dir("opt"), tiny_bundle("opt")
    tune(bundle, corpus_file, root / "adapter", mode="full", seq_len=32,
         cfg=TrainConfig(steps=3, lr=5e-3, batch_size=2, progress=False))
    plugged = plugin(model_dir, root / "adapter", root / "plugged")
    return {"model": model_dir, "bundle": bundle, "adapter": root / "adapter", "plugged": plugged,
            "corpus": corpus_file}
