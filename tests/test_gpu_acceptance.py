"""scripts/gpu_acceptance.sh / .py: the parts a CPU can check. Without CUDA the shell script refuses with
one line; the Python driver's plan, metadata, per-check pass/fail logic, logs and one-screen summary are
exercised with --dry-run and with small stand-in checks; its `setup` step builds the run's inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_driver():
    return load_script("scripts/gpu_acceptance.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without CUDA")
def test_shell_script_refuses_without_cuda_in_one_line():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_acceptance.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA GPU" in proc.stderr
    driver = load_driver()
    assert driver.main(["--out", "/nonexistent/never-made"]) == 2


def test_dry_run_writes_plan_metadata_and_summary(tmp_path, capsys):
    driver = load_driver()
    assert driver.main(["--dry-run", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "acceptance.json").read_text())
    meta = record["meta"]
    assert meta["device"]["name"] and "driver" in meta and "--dry-run" in meta["command"]
    for package in ("torch", "triton", "deepspeed", "git_commit"):
        assert package in meta["versions"], package
    names = [r["check"] for r in record["results"]]
    assert names == [c.name for c in driver.plan(tmp_path)]
    assert {"parity", "patched", "tune-zero3-kernels-on-refused", "kernel-benchmarks", "efficiency-suite",
            "pytest"} <= set(names)
    assert sum(c.budget_s for c in driver.plan(tmp_path)) <= driver.TOTAL_BUDGET_S
    text = (tmp_path / "summary.txt").read_text()
    assert len(text.splitlines()) <= 25 and all(n in text for n in names)
    assert text in capsys.readouterr().out
    assert driver.main(["--dry-run", "--out", str(tmp_path), "--only", "nope"]) == 2


def test_checks_pass_fail_on_exit_code_text_and_time(tmp_path):
    driver = load_driver()
    py = sys.executable
    (tmp_path / "h.json").write_text(json.dumps({"headline": {"ratio": "3.1x"}}))
    checks = [driver.Check("ok", 30, [py, "-c", "print('fine')"], headline="h.json"),
              driver.Check("refusal", 30, [py, "-c", "import sys; print('cannot run'); sys.exit(2)"], expect_rc=2,
                           expect_text="cannot run"),
              driver.Check("wrong-text", 30, [py, "-c", "import sys; sys.exit(2)"], expect_rc=2, expect_text="x"),
              driver.Check("crash", 30, [py, "-c", "raise SystemExit(3)"]),
              driver.Check("slow", 1, [py, "-c", "import time; time.sleep(30)"])]
    import time

    results = [driver.run_check(c, tmp_path, time.time() + 600) for c in checks]
    assert [r["status"] for r in results] == ["pass", "pass", "FAIL", "FAIL", "FAIL"]
    assert results[0]["headline"] == {"ratio": "3.1x"}
    assert "lacks 'x'" in results[2]["why"] and "exit 3" in results[3]["why"] and results[4]["why"] == "timed out"
    assert "fine" in (tmp_path / results[0]["log"]).read_text()
    meta = {"date": "d", "device": {"name": "GPU"}, "driver": "1", "versions": {"torch": "t"}}
    text = driver.write_outputs(tmp_path, meta, results)
    assert "FAILED: wrong-text, crash, slow" in text and "ratio: 3.1x" in text


def test_setup_builds_the_runs_inputs(tmp_path):
    driver = load_driver()
    assert driver.main(["setup", "--work", str(tmp_path)]) == 0
    assert (tmp_path / "bundle").is_dir() and (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "corpus.txt").stat().st_size > 10000


def test_every_planned_command_parses(tmp_path):
    """The CLI and benchmark checks of the plan are valid command lines (a typo would only show on the GPU)."""
    from offsite_ds.cli import build_parser

    driver = load_driver()
    kernel_bench = load_script("benchmarks/kernel_bench.py")
    parsed = 0
    for check in driver.plan(tmp_path):
        argv = check.argv
        if argv[1:3] == ["-m", "offsite_ds"]:
            args = build_parser(only=argv[3]).parse_args(argv[3:])
            assert args.command == argv[3]
            parsed += 1
        elif argv[1].endswith("kernel_bench.py"):
            kernel_bench.parse_args(argv[2:])
            parsed += 1
    assert parsed == 8


def test_parity_and_patched_checks_run_on_cpu_with_the_interpreter(tmp_path):
    """The GPU checks' own code, run on CPU tensors through the interpreter (no int64-sized cases, tiny
    models, 2 steps): every case within its tolerance and bitwise repeatable, headlines written."""
    driver = load_driver()
    assert driver.main(["parity", "--smoke", "--json", str(tmp_path / "parity.json")]) == 0
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert len(parity["rows"]) == 24 and not parity["failures"] and "24/24" in parity["headline"]["parity cases"]
    assert driver.main(["patched", "--smoke", "--steps", "2", "--json", str(tmp_path / "patched.json")]) == 0
    patched = json.loads((tmp_path / "patched.json").read_text())
    assert len(patched["rows"]) == 8 and all("lora_linear" in r["swapped"] for r in patched["rows"])
