"""Interrupted runs continue exactly: same next losses as an uninterrupted run; SIGTERM saves first."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from offsite_ds.roles.tune_adapter import tune
from offsite_ds.train import TrainConfig


@pytest.fixture
def bundle(tiny_bundle):
    return tiny_bundle("opt")


def _cfg(tmp, steps, **kw):
    return TrainConfig(steps=steps, lr=3e-3, batch_size=2, grad_accum=2, warmup_steps=2, log_every=1,
                       progress=False, checkpoint_dir=str(tmp), **kw)


def test_resume_gives_the_same_losses(bundle, corpus_file, tmp_path):
    full = tune(bundle, corpus_file, tmp_path / "a_full", cfg=_cfg(tmp_path / "ck_full", 8), seq_len=32)
    # an interrupted run: 8 total steps planned, stopped after a checkpoint at step 4 ...
    first = tune(bundle, corpus_file, tmp_path / "a_part", cfg=_cfg(tmp_path / "ck", 4, save_every=4), seq_len=32)
    assert not (tmp_path / "ck" / "latest.json").exists(), "no checkpoint at the very last step"
    part = tune(bundle, corpus_file, tmp_path / "a_part", cfg=_cfg(tmp_path / "ck", 8, save_every=4), seq_len=32)
    assert [h["loss"] for h in part["loss_history"][:4]] == [h["loss"] for h in full["loss_history"][:4]]
    assert json.loads((tmp_path / "ck" / "latest.json").read_text())["step"] == 4
    # ... then resumed: the remaining steps match the uninterrupted run bit for bit on CPU
    resumed = tune(bundle, corpus_file, tmp_path / "a_res", cfg=_cfg(tmp_path / "ck", 8, resume=True), seq_len=32)
    assert [h["loss"] for h in resumed["loss_history"]] == [h["loss"] for h in full["loss_history"]]
    assert resumed["steps"] == 8 and first["steps"] == 4


def test_resume_without_checkpoint_is_a_clear_error(bundle, corpus_file, tmp_path):
    from offsite_ds.errors import OffsiteError

    with pytest.raises(OffsiteError, match="no checkpoint"):
        tune(bundle, corpus_file, tmp_path / "a", cfg=_cfg(tmp_path / "none", 2, resume=True), seq_len=32)


def test_sigterm_saves_a_checkpoint_then_resume_finishes(bundle, corpus_file, tmp_path):
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "offsite_ds", "tune", str(bundle), "--data", str(corpus_file), "--out",
           str(tmp_path / "adapter"), "--steps", "100000", "--seq-len", "32", "--batch-size", "2",
           "--checkpoint-dir", str(ck), "--no-progress", "--save-every", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (ck / "latest.json").exists():
        time.sleep(0.2)  # the first periodic checkpoint proves the loop (and its handler) is running
    assert (ck / "latest.json").exists(), "training never reached its first checkpoint"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "checkpoint saved" in err
    step = json.loads((ck / "latest.json").read_text())["step"]
    assert step >= 3  # at least the periodic save; the SIGTERM save is at a later step boundary
    summary = tune(bundle, corpus_file, tmp_path / "adapter", seq_len=32,
                   cfg=TrainConfig(steps=step + 2, batch_size=2, progress=False, checkpoint_dir=str(ck), resume=True))
    assert summary["steps"] == step + 2


def test_wandb_offline_logging(bundle, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tune(bundle, corpus_file, tmp_path / "a", seq_len=32,
         cfg=TrainConfig(steps=2, batch_size=2, progress=False, wandb=True, checkpoint_dir=str(tmp_path / "ck")))
    runs = list((tmp_path / "ck" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), "an offline run was recorded without a login"
