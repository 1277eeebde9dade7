"""scripts/gpu_acceptance.sh / .py and scripts/gpu_wheels.sh: what a CPU can prove before a GPU is lent.

The fast tests check the driver's pieces (per-check process groups and budgets, the $OUT files, the
archive, the unpacking into the one results-folder name). `test_whole_run_in_a_simulation_of_the_gpu_machine`
runs the real shell script as the lent machine would: a fresh virtual environment holding only the
machine's packages (MACHINE_PACKAGES, those installed here, at this environment's versions: torch 2.11 and
transformers 5.17 do not install from PyPI as CPU builds in a test's time) plus the carried wheels for this
Python (.whl/cp311, built by scripts/gpu_wheels.sh from PyPI when absent), the checkout copied without
.git, no network, `--cpu-smoke`; $OUT must hold at most 8 files within the limits on what comes back.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
# the lent GPU machine's Python packages (the device tool's KINDS.md, read 2026-11-17): our run may use these
MACHINE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build
certifi charset-normalizer click cloudpickle cmake colorama contourpy coverage cycler cython einops execnet filelock
fonttools fsspec h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna iniconfig jinja2 joblib
kiwisolver lxml markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx
ninja numpy nvidia-ml-py packaging pandas pathspec peft pillow pip pluggy propcache protobuf psutil pyarrow
py-cpuinfo pygments pyparsing python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece
setuptools six sympy tabulate threadpoolctl tiktoken tokenizers torch tqdm transformers triton typer
typing-extensions typing-inspect urllib3 wheel wrapt xxhash yarl zipp""".split()
# what the machine lacks (issue 19): never linked in, even where a package here depends on it
MACHINE_LACKS = {"deepspeed", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "hjson",
                 "lm-eval", "datasets", "wandb", "liger-kernel", "cut-cross-entropy", "offsite-ds"}
OUT_LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "total_bytes": 64 * 2**20, "depth": 2}
OUT_NAME = re.compile(r"[A-Za-z0-9._-]+")


def load_driver():
    return load_script("scripts/gpu_acceptance.py")


def assert_out_comes_back(out: Path) -> list[Path]:
    """$OUT as the device tool returns it: <= 8 files, 16 MiB each, 64 MiB in all, <= 2 folders down."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= OUT_LIMITS["files"], files
    assert sum(p.stat().st_size for p in files) <= OUT_LIMITS["total_bytes"]
    for p in files:
        rel = p.relative_to(out)
        assert p.stat().st_size <= OUT_LIMITS["file_bytes"], rel
        assert len(rel.parts) - 1 <= OUT_LIMITS["depth"], rel
        assert all(OUT_NAME.fullmatch(part) for part in rel.parts), rel
    return files


def test_plan_fits_the_budget_and_every_command_parses(tmp_path):
    """Budgets add up to the run's share of the 570 s command; the CLI checks are valid command lines."""
    from offsite_ds.cli import build_parser

    driver = load_driver()
    for smoke in (False, True):
        checks = driver.plan(tmp_path / "run", tmp_path / "work", smoke)
        slack = driver.SMOKE_SLACK if smoke else 1  # the simulation's CPU is slower, and shared
        assert sum(c.budget_s for c in checks) <= driver.TOTAL_BUDGET_S * slack and driver.TOTAL_BUDGET_S <= 540
        assert checks[0].name == "setup" and len({c.name for c in checks}) == len(checks)
        for check in checks:
            argv = check.argv
            if argv[1:3] == ["-m", "offsite_ds"]:
                assert build_parser(only=argv[3]).parse_args(argv[3:]).command == argv[3]
            elif argv[2] == "tune":  # the driver's wrapper: what follows "--" is `offsite-ds tune`'s
                tune_args = argv[argv.index("--") + 1:]
                assert build_parser(only="tune").parse_args(["tune", *tune_args]).kernels in check.name
            elif argv[1].endswith("kernel_bench.py"):
                load_script("benchmarks/kernel_bench.py").parse_args(argv[2:])
    names = [c.name for c in driver.plan(tmp_path, tmp_path, False)]
    assert {"parity", "tune-kernels-liger", "tune-kernels-cce", "zero3-opt-6.7b", "efficiency-opt-1.3b",
            "kernel-benchmarks"} <= set(names) and "pytest" not in names


def test_dry_run_says_nothing_was_measured(tmp_path, monkeypatch, capsys):
    driver = load_driver()
    scratch = tmp_path / "tmp"  # where the run's work folder goes, and must not stay
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("OFFSITE_DS_COMMIT", "abc123")
    assert driver.main(["--dry-run", "--out", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "DRY RUN: nothing was measured" in text and "ALL PASSED" not in text
    files = assert_out_comes_back(tmp_path / "out")
    assert sorted(p.name for p in files) == sorted(driver.OUT_FILES)
    meta = json.loads((tmp_path / "out" / "acceptance.json").read_text())["meta"]
    assert "--dry-run" in meta["command"] and meta["versions"]["git_commit"]
    for package in ("torch", "triton", "transformers", "deepspeed", "peft", "liger-kernel", "cut-cross-entropy"):
        assert package in meta["versions"], package
    assert driver.main(["--dry-run", "--out", str(tmp_path), "--only", "nope"]) == 2
    assert not list(scratch.iterdir())


def test_commit_comes_from_the_environment_without_git(monkeypatch):
    from offsite_ds.bench import report

    monkeypatch.setenv(report.COMMIT_ENV, "feedbeef")
    monkeypatch.setattr(report.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("git")))
    assert report.versions()["git_commit"] == "feedbeef"


def test_checks_pass_fail_skip_and_a_timeout_kills_the_whole_group(tmp_path):
    driver = load_driver()
    py = sys.executable
    (tmp_path / "h.json").write_text(json.dumps({"headline": {"ratio": "3.1x"}}))
    pidfile = tmp_path / "child.pid"
    # the check starts a grandchild that would outlive a kill of the parent alone
    sleeper = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
               "time.sleep(60)")
    checks = [driver.Check("ok", 30, [py, "-c", "print('fine \\u00e9')"], headline="h.json"),
              driver.Check("crash", 30, [py, "-c", "raise SystemExit(3)"]),
              driver.Check("absent", 30, [py, "-c", "pass"], needs="no_such_module_here"),
              driver.Check("slow", 3, [py, "-c", sleeper])]
    results = [driver.run_check(c, tmp_path, time.time() + 600, dict(os.environ)) for c in checks]
    assert [r["status"] for r in results] == ["pass", "fail", "skip", "timeout"]
    assert results[0]["headline"] == {"ratio": "3.1x"} and "exit status 3" in results[1]["why"]
    assert "no_such_module_here" in results[2]["why"]
    assert "fine \u00e9" in (tmp_path / results[0]["log"]).read_text()
    slow_log = (tmp_path / results[3]["log"]).read_text()
    assert "started" in slow_log and "timed out after 3 s" in slow_log  # output kept as text, as it came
    child = int(pidfile.read_text())
    for _ in range(50):
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the timed-out check's child {child} still runs")
    budget_gone = driver.run_check(checks[0], tmp_path, time.time() + 2, dict(os.environ))
    assert budget_gone["status"] == "skip" and "no time left" in budget_gone["why"]
    meta = {"date": "d", "device": {"name": "GPU"}, "driver": "1", "versions": {"torch": "t"}}
    text = driver.summary(meta, results, [c.name for c in checks] + ["later"])
    assert "INCOMPLETE: 4/5" in text and "FAILED: crash, slow" in text and "not run later" in text
    assert "ratio: 3.1x" in text


def test_out_archive_keeps_results_not_weights_and_unpacks_by_the_bench_naming_rule(tmp_path, monkeypatch):
    from offsite_ds.bench.report import default_out_dir, results_folder_name

    driver = load_driver()
    run, out = tmp_path / "run", tmp_path / "out"
    (run / "logs").mkdir(parents=True)
    (run / "suite").mkdir()
    (run / "suite" / "results.json").write_text("{}")
    (run / "logs" / "big.log").write_bytes(b"x" * (3 * 2**20) + b"END")
    (run / "suite" / "model.safetensors").write_bytes(b"\0" * 1024)
    device = {"type": "cuda", "name": "NVIDIA H200"}
    meta = {"date": "2026-11-20", "device": device, "driver": "580", "versions": {}, "smoke": False}
    driver.write_outputs(run, meta, [], ["setup"], out)
    assert_out_comes_back(out)
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
        log = tar.extractfile("logs/big.log").read()
    assert "suite/model.safetensors" not in names and {"suite/results.json", "acceptance.json"} <= set(names)
    assert log.endswith(b"END") and len(log) < 2.1 * 2**20
    assert driver.main(["unpack", str(out / "results.tar.gz"), "--dest", str(tmp_path / "results")]) == 0
    name = results_folder_name("2026-11-20", device)
    assert name == "2026-11-20-h200"
    assert default_out_dir({"date": "2026-11-20", "device": device, "spec": {}}).name == name  # the bench's
    assert (tmp_path / "results" / name / "suite" / "results.json").is_file()
    assert driver.main(["unpack", str(tmp_path / "missing.tar.gz")]) == 2
    (tmp_path / "bad.tar.gz").write_bytes(b"not gzip")
    assert driver.main(["unpack", str(tmp_path / "bad.tar.gz")]) == 2


def test_shell_script_names_the_fix_when_the_wheels_are_missing(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OFFSITE_WHEELS": str(tmp_path / "none"), "OUT": str(out)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_acceptance.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "gpu_wheels.sh" in proc.stderr
    assert "NOT RUN" in (out / "summary.txt").read_text()  # even this comes back


def test_shell_script_removes_its_site_folder_when_an_install_fails(tmp_path):
    wheels, scratch, out = tmp_path / "wheels", tmp_path / "tmp", tmp_path / "out"
    wheels.mkdir()
    scratch.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    env = {**os.environ, "PYTHON": sys.executable, "OFFSITE_WHEELS": str(wheels), "OUT": str(out),
           "TMPDIR": str(scratch)}
    before = set(Path("/tmp").glob("offsite-site*"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_acceptance.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "installing" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not list(scratch.iterdir())  # the site folder and its log are gone, failed or not ...
    assert set(Path("/tmp").glob("offsite-site*")) <= before  # ... and were under TMPDIR, not /tmp


# ---------------------------------------------------------------- the simulation of the GPU machine

def _machine_venv(where: Path) -> Path:
    """A venv with no packages of its own, then the machine's packages linked in from this environment."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    site = Path(subprocess.run([str(where / "bin" / "python"), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    from importlib.metadata import distributions

    from packaging.requirements import Requirement

    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    here = Path(sysconfig.get_paths()["purelib"])
    dists = {norm(d.metadata["Name"]): d for d in distributions(path=[str(here)])}
    # the machine's packages, plus what this environment's (newer) versions of them need, minus what it lacks
    wanted, todo = set(), [norm(n) for n in MACHINE_PACKAGES]
    while todo:
        name = todo.pop()
        if name in wanted or name in MACHINE_LACKS or name not in dists:
            continue
        wanted.add(name)
        for text in dists[name].requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    linked = set()
    for name in sorted(wanted):
        dist = dists[name]
        for f in dist.files or []:
            top = f.parts[0]
            if top in linked or top.startswith("..") or top.endswith(".pth") or top == "__pycache__":
                continue
            source = Path(dist.locate_file(top))
            if source.exists():
                (site / top).symlink_to(source)
                linked.add(top)
    return where / "bin" / "python"


@pytest.mark.gpu_sim
def test_whole_run_in_a_simulation_of_the_gpu_machine(tmp_path):
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    wheels = ROOT / ".whl" / tag
    if not any(wheels.glob("*.whl")):  # built once from PyPI, then reused (.whl/ is git-ignored)
        build = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_wheels.sh"),
                                f"{sys.version_info[0]}.{sys.version_info[1]}"], capture_output=True, text=True,
                               env={**os.environ, "PYTHON": sys.executable}, timeout=900)
        assert build.returncode == 0, f"scripts/gpu_wheels.sh needs PyPI: {build.stderr[-500:]}"
    python = _machine_venv(tmp_path / "venv")
    probe = subprocess.run([str(python), "-c", "import torch, transformers, peft\n"
                            "for m in ('deepspeed', 'pydantic', 'datasets', 'lm_eval', 'wandb', 'offsite_ds'):\n"
                            "    try:\n        __import__(m); print('HAS', m)\n    except ImportError: pass"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert probe.returncode == 0 and "HAS" not in probe.stdout, probe.stdout + probe.stderr[-800:]
    repo = tmp_path / "repo"  # the checkout as it travels: no .git, the carried wheels for this Python
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".whl", "__pycache__", "*.egg-info",
                                                              ".pytest_cache", "build", "dist"))
    shutil.copytree(wheels, repo / ".whl" / tag)
    out = tmp_path / "out"
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "OUT": str(out), "OFFSITE_DS_COMMIT": "simulated-commit", "PYTHONNOUSERSITE": "1",
           "PIP_NO_INDEX": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(["bash", "scripts/gpu_acceptance.sh", "--cpu-smoke"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=1500)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").is_file() else ""
    assert proc.returncode == 0, summary + proc.stdout[-2000:] + proc.stderr[-2000:]
    files = assert_out_comes_back(out)
    assert sorted(p.name for p in files) == ["acceptance.json", "results.tar.gz", "summary.txt"]
    record = json.loads((out / "acceptance.json").read_text())
    assert record["meta"]["versions"]["git_commit"] == "simulated-commit"
    assert record["meta"]["versions"]["deepspeed"] and record["meta"]["versions"]["pydantic"]  # from the wheels
    assert [r["check"] for r in record["results"]] == record["planned"]
    assert all(r["status"] == "pass" for r in record["results"]) and "ALL PASSED" in summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".pt"))]
    assert {"parity.json", "zero3.json", "suite/results.json", "kernels/kernels.json"} <= set(names)
    assert not list(tmp_path.glob("offsite-site*")) and not list(tmp_path.glob("offsite-acceptance-work-*"))
