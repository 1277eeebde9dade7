"""benchmarks/kernel_bench.py --cpu-smoke runs every kernel case end to end and writes well-formed results.

The figures of a CPU smoke run mean nothing for GPU performance; what is checked is that each case runs
(eager and ours measured, absent implementations skipped with a reason, never silently) and that the
JSON carries what a GPU run must record: device, date, versions, command, figures and target verdicts.
"""
import json
from pathlib import Path

import pytest
import torch

import conftest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return conftest.load_script("benchmarks/kernel_bench.py")


def test_cpu_smoke_writes_well_formed_results(tmp_path):
    bench = load_script()
    assert bench.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "kernels.json").read_text())
    assert results["format"] == "offsite-ds-kernel-bench" and results["smoke"] is True
    assert results["device"]["type"] == "cpu" and results["date"] and "--cpu-smoke" in results["command"]
    assert results["versions"]["torch"] and results["versions"]["triton"]
    rows = results["results"]
    for row in rows:
        assert {"kernel", "shape", "impl", "status"} <= row.keys()
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"], "a skipped column must say why"
        else:
            assert row["median_ms"] > 0
    for kernel in bench.KERNELS:
        impls = {r["impl"] for r in rows if r["kernel"] == kernel and r["status"] == "ok"}
        assert any(i.startswith("eager") for i in impls), kernel
        assert "ours (triton interpreter)" in impls, f"{kernel}: the kernels themselves must run"
    assert all(r["status"] == "skipped" for r in rows if r["impl"] in ("liger", "cce", "torch.compile"))
    assert any(r["impl"] == "cce" for r in rows if r["kernel"] == "ce"), "Cut Cross-Entropy is a CE column"
    impls = {r["impl"] for r in rows if r["status"] == "ok"}
    assert {"eager (fp32 head, autocast)", "eager (PEFT under autocast)", "cuBLAS + addmm_ (default)"} <= impls
    assert all("p20_ms" in r and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows if r["status"] == "ok")
    ce = [r for r in rows if r["kernel"] == "ce" and r["impl"].startswith("ours")]
    assert ce and all(r["max_abs_grad_diff_vs_eager"] < 1e-5 for r in ce)
    steps = [r for r in rows if r["kernel"] == "step" and r["status"] == "ok"]
    assert steps and all(r["tokens_per_s"] > 0 for r in steps)
    assert {t["target"] for t in results["targets"]} == set(bench.TARGETS)
    assert all(t["status"].startswith("not evaluated") for t in results["targets"]), "no verdicts from a CPU run"
    table = (tmp_path / "kernels.md").read_text()
    assert "CPU smoke run" in table and "| ce |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without CUDA; on a GPU the full run starts")
def test_gpu_run_refuses_cleanly_without_cuda(capsys):
    bench = load_script()
    assert bench.main(["--kernels", "ce"]) == 2
    assert "--cpu-smoke" in capsys.readouterr().err
    assert bench.main(["--cpu-smoke", "--kernels", "nope"]) == 2
