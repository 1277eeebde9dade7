"""The Runtime: the one home of rank/device/precision facts, the ds config filled once, the ZeRO-3 lifetime."""
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offsite_ds import runtime as rt
from offsite_ds.errors import OffsiteError
from offsite_ds.runtime import Runtime, load_model
from offsite_ds.tiny import tiny_config
from offsite_ds.train import TrainConfig, _StepWindow, for_output


def test_plain_runtime_on_cpu():
    r = Runtime(device="cpu")
    assert (r.rank, r.world, r.device.type, r.is_main) == (0, 1, "cpu", True)
    assert r.bf16 is False and r.autocast_bf16 is False and r.weight_dtype == torch.float32
    assert r.configure(TrainConfig()) is None and r.ds_config is None
    assert Runtime(precision="bf16", device="cpu").autocast_bf16 is True
    with pytest.raises(OffsiteError, match="--precision fp16 must be"):
        Runtime(precision="fp16", device="cpu")


def test_ds_config_is_filled_once_and_zero3_lives_as_long_as_the_runtime(monkeypatch):
    from transformers.integrations import is_deepspeed_zero3_enabled

    import offsite_ds.ds_config as ds

    calls = []
    real = ds.build_ds_config
    monkeypatch.setattr(rt, "init_distributed", lambda: None)  # no process group needed to fill a config
    monkeypatch.setattr(ds, "build_ds_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = TrainConfig(batch_size=2, precision="bf16", deepspeed="zero3")
    with Runtime.from_config(cfg) as r:
        first = r.configure(cfg, tiny_config("opt"))
        assert r.configure(cfg, tiny_config("opt")) is first and len(calls) == 1
        assert r.zero_stage == 3 and r.weight_dtype == torch.bfloat16 and r.autocast_bf16 is False
        assert is_deepspeed_zero3_enabled()
    gc.collect()
    assert not is_deepspeed_zero3_enabled()  # released with the Runtime


def test_train_config_is_immutable():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.checkpoint_dir = "x"
    derived = for_output(cfg, "/tmp/out/adapter")
    assert cfg.checkpoint_dir is None and derived.checkpoint_dir == "/tmp/out/adapter.checkpoints"
    assert for_output(dataclasses.replace(cfg, checkpoint_dir="mine"), "/tmp/a").checkpoint_dir == "mine"


def test_step_window_averages_loss_and_role_metrics():
    window = _StepWindow()
    window.add(torch.tensor(1.0), {"kd_loss": 0.5})
    window.add(torch.tensor(3.0), {"kd_loss": 1.5})
    assert window.close() == {"loss": 2.0, "kd_loss": 1.0}
    window.add(torch.tensor(5.0), {})
    assert window.close() == {"loss": 5.0}


def test_the_one_loader_names_the_problem(tmp_path):
    with pytest.raises(OffsiteError, match="no config.json"):
        load_model(tmp_path)


_FRAGMENT = r"""
import json, sys, torch
from offsite_ds.runtime import return_freed_memory
took = return_freed_memory() if sys.argv[1] == "fixed" else None

def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

torch.empty(1 << 21)  # one 8 MiB buffer freed: glibc's dynamic threshold rises above 2 MiB
buf = [torch.ones(1 << 19) for _ in range(100)]  # 100 x 2 MiB
keep = torch.ones(1 << 19)  # a live buffer above them
before = rss_mb()
del buf
print(json.dumps({"took": took, "freed_mb": before - rss_mb()}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc on Linux")
def test_return_freed_memory_gives_freed_buffers_back():
    """200 MiB of 2 MiB buffers freed below a live one: glibc's default keeps them; the fixed threshold does not."""
    def run(mode: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], env=env, capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    default, fixed = run("default"), run("fixed")
    assert default["freed_mb"] < 50  # the pattern does fragment under glibc's own policy
    assert fixed["took"] is True and fixed["freed_mb"] > 150


def test_return_freed_memory_keeps_the_users_setting(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert rt.return_freed_memory() is False


def test_only_the_owners_memory_bound_commands_set_the_allocator_policy(tiny_model_dir, tmp_path, monkeypatch):
    """emulate sets it (memory-bound, streamed); other commands keep glibc's default (it costs training ~8% time)."""
    from offsite_ds.cli import main

    calls = []
    monkeypatch.setattr(rt, "return_freed_memory", lambda *a: calls.append(a) or True)
    assert main(["emulate", str(tiny_model_dir("opt")), "--layout", "1-2-1", "--select", "uniform", "--no-calib",
                 "--out", str(tmp_path / "b")]) == 0
    assert len(calls) == 1
    assert main(["plan", "opt-6.7b", "--gpus", "8"]) == 0 and len(calls) == 1
