"""Real 2-rank runs through the `deepspeed` launcher on CPU (DS_ACCELERATOR=cpu, gloo) on tiny OPT and BLOOM.

On the CPU accelerator `deepspeed --num_gpus 2` starts two ranks on one host (the launcher counts NUMA
nodes as "devices" but --num_gpus overrides it). Each launch costs ~15 s of start-up, so the runs are
few and each one checks several things.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offsite_ds.bundle import load_bundle
from offsite_ds.data import load_blocks
from offsite_ds.roles.distill import build_distill_model

TRAIN = ["--seq-len", "32", "--batch-size", "2", "--warmup", "0", "--no-progress", "--torch-adam", "--log-every", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_cmd(*args: str, module: bool = True, ranks: int = 2) -> list[str]:
    """`deepspeed --num_gpus N [--module] ...`, with a free port so parallel test runs do not collide."""
    exe = Path(sys.executable).with_name("deepspeed")
    runner = [str(exe)] if exe.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*runner, "--num_gpus", str(ranks), "--master_port", str(_free_port()),
            *(["--module"] if module else []), *args]


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(*args: str, module: bool = True, timeout: int = 300, extra_env: dict | None = None,
           ranks: int = 2):
    cmd = launcher_cmd(*args, module=module, ranks=ranks)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**_env(), **(extra_env or {})})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    port = cmd[cmd.index("--master_port") + 1]
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"the ranks left their shared-memory buffers behind: {leaked}"  # RAM on tmpfs
    return proc


def held_out_kd(model_dir: Path, bundle_dir: Path, ids: torch.Tensor) -> float:
    model = build_distill_model(model_dir, bundle_dir, load_bundle(bundle_dir).manifest, None, 30.0, 1.0)
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)["kd_loss"])


def differing_tensors(a: dict, b: dict) -> set[str]:
    assert set(a) == set(b)
    return {k for k in a if not torch.equal(a[k], b[k])}


PROBE = r'''
"""Runs `offsite_ds distill` on every rank, with a probe around the training: the teacher before/after."""
import json, os, sys
import torch
from offsite_ds.roles import distill as D
from offsite_ds.runtime import rank_and_world
from offsite_ds.zero3 import full_numel, gathered

def rank():
    return rank_and_world()[0]

def snapshot(teacher):
    snap, local = {}, {}
    for name, p in teacher.named_parameters():
        part = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        local[name] = (p.numel(), full_numel(p), part)
        with gathered([p]):
            if rank() == 0:
                snap[name] = p.detach().clone()
    return snap, local

original = D.train

def probed(role, loader, cfg, *args, **kwargs):
    before, local = snapshot(role.model.teacher)
    summary = original(role, loader, cfg, *args, **kwargs)
    after, _ = snapshot(role.model.teacher)
    if rank() == 0:
        torch.save({"before": before, "after": after, "local": local}, os.environ["PROBE_OUT"])
    return summary

D.train = probed
from offsite_ds.cli import main
sys.exit(main())
'''


def test_distill_opt_zero3_two_ranks(tiny_model_dir, tiny_bundle, corpus_file, tmp_path):
    model_dir = tiny_model_dir("opt")
    bundle = tiny_bundle("opt")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "distilled"
    launch(str(probe), "distill", str(model_dir), "--bundle", str(bundle), "--data", str(corpus_file), "--out",
           str(out), "--steps", "12", "--lr", "1e-3", "--deepspeed", "zero3", *TRAIN, module=False,
           extra_env={"PROBE_OUT": str(tmp_path / "probe.pt")})
    seen = torch.load(tmp_path / "probe.pt")
    # the teacher was sharded (each rank held half of every tensor above the persistence threshold,
    # 10 x hidden), and it did not move by one bit
    big = [v for v in seen["local"].values() if v[1] > 10 * 32]
    assert big and all(visible == 0 and part == (full + 1) // 2 for visible, full, part in big)
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, tensor in seen["before"].items():
        index, rest = name.split(".", 1)
        assert torch.equal(full[f"model.decoder.layers.{2 + int(index)}.{rest}"], tensor), name
    # the export: a loadable bundle that differs from the layer-drop one in the student blocks only
    distilled, source = load_bundle(out), load_bundle(bundle)
    changed = differing_tensors(source.model.state_dict(), distilled.model.state_dict())
    assert changed and {name.split(".")[3] for name in changed} == {"2", "3"}
    record = distilled.manifest.compression.distillation
    assert record["steps"] == 12 and record["world_size"] == 2 and record["zero_stage"] == 3
    assert record["tokens"] == 12 * 2 * 32 * 2
    assert distilled.manifest.base_fingerprint == source.manifest.base_fingerprint
    ids, _ = load_blocks(corpus_file, source.tokenizer, 32, max_blocks=8)
    assert held_out_kd(model_dir, out, ids) < 0.8 * held_out_kd(model_dir, bundle, ids)


def test_distill_bloom_zero3_offload_two_ranks(tiny_model_dir, tiny_bundle, corpus_file, tmp_path):
    model_dir = tiny_model_dir("bloom")
    bundle = tiny_bundle("bloom")
    out = tmp_path / "distilled"
    proc = launch("offsite_ds", "distill", str(model_dir), "--bundle", str(bundle), "--data", str(corpus_file),
                  "--out", str(out), "--steps", "12", "--lr", "1e-3", "--deepspeed", "zero3_offload", *TRAIN)
    assert "distilled emulator bundle" in proc.stdout
    source, distilled = load_bundle(bundle), load_bundle(out)
    changed = differing_tensors(source.model.state_dict(), distilled.model.state_dict())
    assert changed and {name.split(".")[2] for name in changed} == {"2", "3"}
    ids, _ = load_blocks(corpus_file, source.tokenizer, 32, max_blocks=8)
    assert held_out_kd(model_dir, out, ids) < 0.8 * held_out_kd(model_dir, bundle, ids)


FT_STEPS = "30"


@pytest.fixture(scope="module")
def opt_ft_run(tiny_model_dir, corpus_file, tmp_path_factory):
    """Uninterrupted FT of tiny OPT under ZeRO-3, 2 ranks: the reference for the resume test too."""
    tmp = tmp_path_factory.mktemp("ft")
    launch("offsite_ds", "finetune", str(tiny_model_dir("opt")), "--data", str(corpus_file), "--out",
           str(tmp / "ft"), "--steps", FT_STEPS, "--lr", "1e-3", "--deepspeed", "zero3", "--summary-json",
           str(tmp / "summary.json"), *TRAIN)
    return tmp


def _losses(summary_path: Path) -> list[float]:
    return [h["loss"] for h in json.loads(summary_path.read_text())["loss_history"]]


def test_ft_opt_zero3_lowers_the_loss_and_exports_a_plain_model(opt_ft_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    losses = _losses(opt_ft_run / "summary.json")
    assert len(losses) == int(FT_STEPS)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    tuned = AutoModelForCausalLM.from_pretrained(opt_ft_run / "ft").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("opt")).state_dict()
    changed = differing_tensors(base, tuned)
    assert any("layers.0." in k for k in changed) and any("embed_tokens" in k for k in changed)
    assert json.loads((opt_ft_run / "ft" / "offsite.json").read_text())["mode"] == "ft"


def test_ft_lora_bloom_zero2_lowers_the_loss_and_exports_merged(tiny_model_dir, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM

    launch("offsite_ds", "finetune", str(tiny_model_dir("bloom")), "--lora", "--data", str(corpus_file), "--out",
           str(tmp_path / "ft"), "--steps", "16", "--lr", "3e-3", "--deepspeed", "zero2", "--summary-json",
           str(tmp_path / "summary.json"), *TRAIN)
    losses = _losses(tmp_path / "summary.json")
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").state_dict()  # plain names: LoRA merged
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("bloom")).state_dict()
    changed = differing_tensors(base, tuned)
    assert len(changed) == 8 and all(k.endswith("query_key_value.weight") for k in changed)


def test_sigterm_then_resume_continues_exactly(opt_ft_run, tiny_model_dir, corpus_file, tmp_path):
    """Pre-emption as a cluster does it to the launcher: SIGTERM -> both ranks save -> --resume -> same losses."""
    import psutil

    args = ["offsite_ds", "finetune", str(tiny_model_dir("opt")), "--data", str(corpus_file), "--out",
            str(tmp_path / "ft"), "--steps", FT_STEPS, "--lr", "1e-3", "--deepspeed", "zero3", *TRAIN]
    ck = tmp_path / "ft.checkpoints"
    proc = subprocess.Popen(launcher_cmd(*args, "--save-every", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (ck / "latest.json").exists():
            time.sleep(0.05)
        assert (ck / "latest.json").exists(), "no checkpoint before the run ended"
        # the `deepspeed` launcher's per-node process signals rank 0 first and rank 1 only after rank 0 exits
        launchers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                     if "deepspeed.launcher.launch" in " ".join(c.cmdline())]
        assert launchers, "launcher process not found"
        launchers[0].send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert output.count("SIGTERM: checkpoint saved at step") == 2, output[-3000:]  # both ranks, same step
    step = json.loads((ck / "latest.json").read_text())["step"]
    assert 2 <= step < int(FT_STEPS)
    launch(*args, "--resume", "--summary-json", str(tmp_path / "summary.json"))
    assert _losses(tmp_path / "summary.json") == _losses(opt_ft_run / "summary.json")


RESUME_PROBE = r'''
"""`offsite_ds` with a probe: the module's weights right after the checkpoint was loaded."""
import os, sys
import torch
from offsite_ds import engines as E

original = E.DeepSpeedEngine.load_checkpoint

def probed(self, directory):
    state = original(self, directory)
    torch.save({k: v.detach().clone() for k, v in self.module.state_dict().items()}, os.environ["PROBE_OUT"])
    return state

E.DeepSpeedEngine.load_checkpoint = probed
from offsite_ds.cli import main
sys.exit(main())
'''


def test_resume_on_another_world_size_two_ranks_to_one(tiny_model_dir, corpus_file, tmp_path):
    """A ZeRO-2 FT checkpoint of 2 ranks resumes on 1 rank through DeepSpeed's universal checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    args = ["finetune", str(tiny_model_dir("bloom")), "--data", str(corpus_file), "--out", str(tmp_path / "ft"),
            "--lr", "1e-3", "--deepspeed", "zero2", *TRAIN]
    launch("offsite_ds", *args, "--steps", "3", "--save-every", "2")
    ck = tmp_path / "ft.checkpoints"
    assert json.loads((ck / "latest.json").read_text())["step"] == 2
    probe = tmp_path / "probe.py"
    probe.write_text(RESUME_PROBE)
    proc = launch(str(probe), *args, "--steps", "4", "--resume", "--summary-json", str(tmp_path / "s.json"),
                  module=False, ranks=1, extra_env={"PROBE_OUT": str(tmp_path / "loaded.pt")})
    assert "resumed from" in proc.stderr and (ck / "step00000002" / "universal" / "zero").is_dir()
    loaded = torch.load(tmp_path / "loaded.pt")
    saved = get_fp32_state_dict_from_zero_checkpoint(str(ck), tag="step00000002")
    assert set(saved) <= set(loaded)
    for name, tensor in saved.items():  # the 2-rank partitions, reassembled on the one rank
        assert torch.equal(loaded[name].float(), tensor), name
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps"] == 4 and [h["step"] for h in summary["loss_history"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("ranks", [1, 2])
def test_tune_under_zero3_exports_whole_tensors_that_plug_in(ranks, tiny_model_dir, tiny_bundle, corpus_file, tmp_path):
    """A ZeRO-3 parameter is an empty shard until gathered: the exported adapter must hold the full tensors
    (one rank, as a data owner on one GPU, and two), and the owner's plugin must accept them."""
    from offsite_ds.adapter_package import load_adapter_package
    from offsite_ds.plugin import plugin

    model_dir = tiny_model_dir("opt")
    bundle = tiny_bundle("opt")
    launch("offsite_ds", "tune", str(bundle), "--data", str(corpus_file), "--out", str(tmp_path / "adapter"),
           "--steps", "3", "--lr", "1e-3", "--deepspeed", "zero3", "--torch-adam", "--seq-len", "32",
           "--batch-size", "2", "--no-progress", ranks=ranks)
    package = load_adapter_package(tmp_path / "adapter")
    assert package.tensors and all(t.numel() > 0 for t in package.tensors.values())
    assert (plugin(model_dir, tmp_path / "adapter", tmp_path / "plugged") / "config.json").is_file()
