"""A fresh machine: nothing of ours shadows Hugging Face's `kernels`, the wheel carries every resource, and
the default recipe needs nothing beyond `pip install offsite-ds`.

The full check of an installed wheel in a new virtual environment (install from the lock, round trip with
a stock ZeRO-3 config by name, outside the checkout) is `scripts/check_wheel.sh`, which CI runs.
"""
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_the_repository_has_no_top_level_kernels_package():
    """A regular package `kernels/` at the root would shadow HF's whenever the root is on sys.path."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "runtime.py").is_file()  # the card's layout: the sources stay here


def test_no_folder_a_user_runs_from_shadows_an_installed_package():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path (a benchmarks/kernels.py once shadowed HF's
    kernels that way); the root, scripts/, tests/, launch/ and kernels/ likewise. None may hold a module or
    package named like any installed distribution's top-level import."""
    installed = set(importlib.metadata.packages_distributions()) - {"offsite_ds"}
    for folder in (ROOT, *(ROOT / name for name in ("benchmarks", "scripts", "tests", "launch", "kernels"))):
        names = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir()
                                                          if p.is_dir() and (p / "__init__.py").is_file()}
        assert not names & installed, f"{folder.relative_to(ROOT)}/ shadows {sorted(names & installed)}"


def test_from_the_repository_root_transformers_imports_and_a_round_trip_runs(tmp_path):
    """What `python -m pytest`, `python -c` and `python -m offsite_ds` see from the root (sys.path[0] = root)."""
    code = (
        "import importlib.util, sys\n"
        f"assert sys.path[0] in ('', {str(ROOT)!r})\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"hf = {_hf_kernels_installed()!r}\n"
        "assert not hf or (spec.origin and 'site-packages' in spec.origin), spec\n"
        "from transformers import LlamaForCausalLM, OPTForCausalLM  # imports HF's kernels when installed\n"
        "import offsite_ds.kernels as k\n"
        f"assert any(p.rstrip('/').endswith('kernels') and 'offsite_ds' not in p for p in k.__path__), k.__path__\n"
        "from offsite_ds.tiny import save_tiny_model\n"
        f"save_tiny_model('llama', {str(tmp_path / 'tiny')!r}, n_layers=6)\n"
    )
    env = {"PYTHONPATH": ""}
    run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,  # noqa: E731
                                      env={**__import__("os").environ, **env})
    proc = run(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog . " * 200)
    for argv in (["emulate", tmp_path / "tiny", "--layout", "2-2-2", "--out", tmp_path / "bundle", "--no-progress",
                  "--calib-tokens", "256"],
                 ["tune", tmp_path / "bundle", "--data", corpus, "--out", tmp_path / "adapter", "--steps", "2",
                  "--seq-len", "32", "--batch-size", "2", "--kernels", "on", "--no-progress"],
                 ["plugin", tmp_path / "tiny", tmp_path / "adapter", "--out", tmp_path / "plugged"]):
        proc = run(sys.executable, "-m", "offsite_ds", *map(str, argv))
        assert proc.returncode == 0, (argv[0], proc.stderr[-3000:])
    assert (tmp_path / "plugged" / "config.json").is_file()


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed")
def test_pytest_itself_sees_hugging_faces_kernels():
    """This process was started from the repository root (`python -m pytest`), with the root on sys.path."""
    import kernels

    assert ROOT not in Path(kernels.__file__).resolve().parents


def test_the_wheel_carries_kernels_configs_and_public_text_inside_the_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    for name in ("offsite_ds", "kernels", "ds_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("offsite_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert {f"offsite_ds/kernels/{k}" for k in kernels} | {"offsite_ds/kernels/__init__.py"} <= names
    assert {f"offsite_ds/ds_configs/{c.name}" for c in (ROOT / "ds_configs").glob("*.json")} <= names
    assert {"offsite_ds/public_text/wikipedia_sample.train.txt", "offsite_ds/public_text/SOURCE.md"} <= names
    assert not any(n.startswith(("kernels/", "ds_configs/")) for n in names), "a top-level folder in the wheel"


def test_default_emulate_needs_no_gensim_and_the_full_corpus_says_how_to_get_it(tiny_model_dir, tmp_path,
                                                                               monkeypatch, capsys):
    from offsite_ds import demo_assets
    from offsite_ds.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == demo_assets.WIKI_PACKAGE else real_find_spec(name, *a))
    monkeypatch.setenv("OFFSITE_DS_CACHE", str(tmp_path / "cache"))  # no converted corpus lying around
    model = str(tiny_model_dir("opt"))
    assert main(["emulate", model, "--layout", "2-2-2", "--out", str(tmp_path / "b"), "--calib-tokens", "256",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["emulate", model, "--layout", "2-2-2", "--out", str(tmp_path / "c"),
                 "--calib-data", "builtin:wikipedia"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps gensim" in err and "builtin:public-sample" in err
    assert not (tmp_path / "c").exists()
