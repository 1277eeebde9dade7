"""Experiments are code, results are data: no code inside benchmarks/results/, every results folder has its
meta.json and a row in the generated index, and the moved experiment scripts name no machine's paths."""
import json
import re
import subprocess

from conftest import ROOT, load_script

index = load_script("benchmarks/results_index.py")
MACHINE_PATHS = re.compile(r"/work/|/root/|/home/|~/\.cache|/tmp/e\d")


def test_no_code_inside_results():
    code = [str(p.relative_to(ROOT)) for p in index.RESULTS.rglob("*")
            if p.is_file() and (p.suffix in index.CODE_SUFFIXES or p.stat().st_mode & 0o111)]
    assert not code, f"code inside benchmarks/results/ (move it to benchmarks/ or experiments/): {code}"


def test_every_folder_has_meta_and_the_index_is_generated():
    for folder in index.folders():
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-.+", folder.name), f"{folder.name}: results folders start with a date"
        meta = json.loads((folder / index.META).read_text())
        assert set(index.FIELDS) <= set(meta), f"{folder.name}/meta.json lacks {set(index.FIELDS) - set(meta)}"
        assert meta["folder"] == folder.name and meta["date"] == folder.name[:10]
        for path in meta["code"]:
            assert (ROOT / path).exists(), f"{folder.name}/meta.json names code that does not exist: {path}"
    text = index.INDEX.read_text()
    assert text == index.index_text(), "benchmarks/results/README.md is stale: python benchmarks/results_index.py index"
    assert all(f"[{f.name}]" in text for f in index.folders())


def test_the_index_shows_a_folder_without_meta(tmp_path):
    (tmp_path / "2030-01-01-new").mkdir()
    assert "| 2030-01-01-new | 2030-01-01 | unknown | no meta.json yet |" in index.index_text(tmp_path)


def test_experiments_name_no_machine_paths_and_parse():
    scripts = sorted(p for p in (ROOT / "experiments").rglob("*") if p.suffix in (".py", ".sh"))
    assert scripts
    for script in scripts:
        text = script.read_text()
        assert not MACHINE_PATHS.search(text), f"{script.relative_to(ROOT)} names a machine's path"
        if script.suffix == ".py":
            compile(text, str(script), "exec")
        else:
            subprocess.run(["bash", "-n", str(script)], check=True)


def test_fingerprint_covers_names_and_contents(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    first = index.fingerprint(tmp_path)
    (tmp_path / "a.txt").write_text("y")
    assert index.fingerprint(tmp_path) != first and index.fingerprint(tmp_path / "a.txt").startswith("sha256:")
