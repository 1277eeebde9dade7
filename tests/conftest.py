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


def pytest_configure(config):
    """Markers registered here (merges with a [tool.pytest] markers list): deselect with -m 'not gpu_sim'."""
    config.addinivalue_line("markers", "gpu_sim: runs scripts/gpu_acceptance.sh in a simulation of the lent GPU "
                                       "machine (a venv of its packages, the carried wheels; about 3 min of CPU)")
