"""The benchmark suite in its CPU smoke mode: every setting runs through the real training loop and
the JSON, table and plot are well formed. No timing is asserted (CPU numbers mean nothing)."""
import json
import math
from pathlib import Path

import pytest
import torch

from offsite_ds.cli import main

SETTINGS = ("ft", "ft-lora", "ot", "ot-lora", "ot-lora-kernels")


def _kernels_available() -> bool:
    try:
        from offsite_ds.kernels import patch  # noqa: F401
    except ImportError:
        return False
    return True


def _bench(out: Path, *extra: str, model: str = "tiny-opt") -> int:
    return main(["bench", "--smoke", "--model", model, "--seq-len", "16", "--steps", "2", "--warmup", "1",
                 "--out", str(out), *extra])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    rc = _bench(out, model="opt-1.3b")  # --smoke: a tiny OPT of OPT-1.3B's depth, the paper's layout
    return rc, out, json.loads((out / "results.json").read_text())


def test_smoke_json_is_well_formed(smoke_run):
    rc, out, results = smoke_run
    assert rc == 0
    assert results["format"] == "offsite-ds-bench" and results["status"] == "complete"
    assert results["device"]["type"] == "cpu" and results["device"]["peak_tflops"] is None
    assert results["versions"]["torch"] == torch.__version__
    assert results["command"].startswith("offsite-ds bench") and "--smoke" in results["command"]
    assert [r["setting"] for r in results["runs"]] == list(SETTINGS)
    for r in results["runs"]:
        assert r["status"] in ("ok", "skipped"), r
        assert r["model"] == "opt-1.3b (tiny)" and r["seq_len"] == 16 and r["batch_size"] == 1
    ok = {r["setting"]: r for r in results["runs"] if r["status"] == "ok"}
    assert set(ok) >= {"ft", "ft-lora", "ot", "ot-lora"}
    for r in ok.values():
        assert r["tokens_per_s"] > 0 and r["step_time_ms"]["min"] > 0
        assert r["flops_per_token"] > 0 and r["mfu"] is None  # no MFU on CPU
        assert r["peak_allocated_mb"] is None  # no CUDA memory statistics on CPU
        assert math.isfinite(r["final_loss"])
        assert 0 < r["trainable_params"] <= r["resident_params"]
        assert r["resident_params"] <= r["base_params"] + r["trainable_params"]  # LoRA adds its matrices
        assert r["engine"] == "torch" and r["vs_ft"]["speedup"] > 0
    assert ok["ft"]["trainable_params"] == ok["ft"]["resident_params"] == ok["ft"]["base_params"]
    assert ok["ft-lora"]["trainable_params"] < ok["ot"]["trainable_params"] < ok["ft"]["trainable_params"]
    assert ok["ot"]["resident_params"] < ok["ft"]["resident_params"]
    assert ok["ot"]["layout"] == "2-8-2" and ok["ot"]["block_map"] == [0, 1, 2, 5, 7, 10, 13, 16, 18, 21, 22, 23]
    assert ok["ot"]["flops_per_token"] < ok["ft"]["flops_per_token"]
    assert ok["ft"]["vs_ft"]["speedup"] == 1.0
    kernels = results["runs"][-1]
    if _kernels_available():
        assert kernels["status"] == "ok" and kernels["kernels"]["patched"]
    else:
        assert kernels["status"] == "skipped" and "offsite_ds.kernels.patch" in kernels["reason"]


def test_smoke_table_and_plot(smoke_run):
    _, out, _ = smoke_run
    table = (out / "results.md").read_text()
    assert "CPU smoke run on tiny shapes" in table
    for label in ("| FT |", "| FT+LoRA |", "| OT |", "| OT+LoRA |", "| OT+LoRA+kernels |"):
        assert label in table
    assert "2.57x" in table  # the paper's FT+LoRA speed-up for OPT-1.3B stands beside (1316 -> 3379 tok/s)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_oom_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    from offsite_ds.bench import runner

    real = runner.measure

    def measure(case):
        if case["setting"] == "ft":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(case)

    monkeypatch.setattr(runner, "measure", measure)
    assert _bench(tmp_path / "oom", "--settings", "ft,ot-lora") == 0
    runs = json.loads((tmp_path / "oom" / "results.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["oom", "ok"]
    assert "out of memory" in runs[0]["reason"]
    assert runs[1]["vs_ft"]["speedup"] is None  # no FT to compare with
    assert "**OOM**" in (tmp_path / "oom" / "results.md").read_text()


def test_max_batch_search(tmp_path):
    assert _bench(tmp_path / "max", "--settings", "ot-lora", "--batch-size", "max", "--max-batch", "2") == 0
    (run,) = json.loads((tmp_path / "max" / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["batch"] == "max" and run["batch_size"] == 2
    assert run["batch_search"] == {"tried": [1, 2], "first_oom": None, "limit": 2}


def test_one_process_per_case(tmp_path):
    assert _bench(tmp_path / "iso", "--settings", "ot-lora", "--isolate") == 0
    results = json.loads((tmp_path / "iso" / "results.json").read_text())
    assert results["isolation"] == "one process per case"
    assert results["runs"][0]["status"] == "ok" and results["runs"][0]["tokens_per_s"] > 0


def test_ft_with_zero3_offload_runs_through_the_deepspeed_engine():
    """The path FT takes when the model does not fit one GPU, run here on CPU (DS_ACCELERATOR=cpu)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("offsite_ds.zero3")
    from offsite_ds.bench.runner import DS_OFFLOAD_CONFIG, offload_unavailable, run_case_isolated

    missing = offload_unavailable(None)
    if missing:
        pytest.skip(missing)
    case = {"model": "tiny-opt:4", "smoke": True, "setting": "ft", "layout": None, "batch_size": 1, "seq_len": 16,
            "steps": 1, "warmup": 1, "device": "cpu", "weights": "fp32", "lora_r": 4, "lora_alpha": 32.0,
            "seed": 0, "lr": 1e-5, "peak_tflops": None, "ds_config": str(DS_OFFLOAD_CONFIG), "offload": True}
    result = run_case_isolated(case)
    assert result["status"] == "ok", result
    assert result["engine"] == "deepspeed-zero3-offload" and result["params_on"].startswith("cpu")
    assert result["trainable_params"] == result["base_params"] > 0  # counted through ZeRO-3's ds_numel
    assert math.isfinite(result["final_loss"])


@pytest.mark.parametrize("extra,message", [
    (("--settings", "ft,warp"), "unknown setting"),
    (("--layout", "9-9-9"), "layout"),
    (("--model", "no-such-model"), "unknown model"),
    (("--batch-size", "0"), "--batch-size"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, extra, message):
    assert _bench(tmp_path / "bad", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "results.json").exists()


def test_sequence_longer_than_the_model_is_skipped(tmp_path):
    assert _bench(tmp_path / "long", "--settings", "ot", "--seq-len", "16,4096") == 0
    runs = json.loads((tmp_path / "long" / "results.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok", "skipped"] and "exceeds" in runs[1]["reason"]


def test_builtin_shapes_match_the_published_parameter_counts():
    from offsite_ds.bench.settings import count_params, meta_model
    from offsite_ds.bench.shapes import resolve_shape

    published = {"opt-1.3b": 1_315_758_080, "opt-6.7b": 6_658_473_984, "gpt2-xl": 1_557_611_200,
                 "bloom-7b1": 7_069_016_064}
    for name, params in published.items():
        assert count_params(meta_model(resolve_shape(name).config)) == params, name
    assert resolve_shape("gpt2-xl", smoke=True).depth == 48


def test_layouts_per_model():
    from offsite_ds.bench.runner import parse_layouts
    from offsite_ds.bench.shapes import resolve_shape

    shapes = [resolve_shape("opt-1.3b"), resolve_shape("gpt2-xl")]
    assert parse_layouts(None, shapes) == {"opt-1.3b": "2-8-2", "gpt2-xl": "2-16-2"}
    assert parse_layouts("1-4-1", shapes) == {"opt-1.3b": "1-4-1", "gpt2-xl": "1-4-1"}
    assert parse_layouts("gpt2-xl=2-8-2", shapes) == {"opt-1.3b": "2-8-2", "gpt2-xl": "2-8-2"}


def test_offload_decision_and_device_peaks():
    from offsite_ds.bench.devices import peak_for_name
    from offsite_ds.bench.runner import ft_fits

    gib = 2**30
    assert ft_fits(1_315_758_080, "fp32", 80 * gib)[0]  # OPT-1.3B FT fits an 80 GB GPU
    fits, why = ft_fits(6_658_473_984, "fp32", 80 * gib)  # OPT-6.7B does not: ZeRO-3 offload
    assert not fits and "6.66B" in why
    assert peak_for_name("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert peak_for_name("NVIDIA H100 PCIe")[0] == 756.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_for_name("NVIDIA RTX A6000")[0] == 154.8
    assert peak_for_name("Some Future GPU")[0] is None


def test_script_is_the_same_command(capsys):
    from conftest import load_script

    module = load_script("benchmarks/finetune.py")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--settings" in capsys.readouterr().out


def test_target_check_says_by_how_much():
    from offsite_ds.bench.report import target_check

    group = [{"setting": "ft", "status": "ok", "tokens_per_s": 1000.0, "peak_allocated_mb": 30000.0, "mfu": 0.2},
             {"setting": "ot-lora", "status": "ok", "tokens_per_s": 7000.0, "peak_allocated_mb": 5000.0,
              "mfu": 0.40, "layout": "2-8-2"},
             {"setting": "ot-lora-kernels", "status": "ok", "tokens_per_s": 9000.0, "peak_allocated_mb": 3000.0,
              "mfu": 0.44, "layout": "2-8-2"}]
    line = target_check("opt-1.3b", group, "cuda")
    assert "speedup 9.00x (missed by 1.00x, 90% of the target)" in line
    assert "memory reduction 10.00x (met)" in line
    assert "MFU 44.0% (missed by 1.0 points)" in line
    assert "not assessed (CPU run)" in target_check("opt-1.3b", group, "cpu")
    assert target_check("gpt2-xl", group, "cuda") is None
