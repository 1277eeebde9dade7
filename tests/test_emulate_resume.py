"""An interrupted `emulate` goes on (offsite_ds.fitting.FitCheckpoints): stopped during the block fit, during the
KL phase, by SIGTERM or by the guard, the same command writes the very bundle an uninterrupted run writes, from
what was kept; a folder of another run, or a foreign one, is refused in one line; the folder goes once the bundle
is written."""
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

FIT = dict(tokens=1024, epochs=2, lr=1e-3, kl_epochs=2, kl_lr=1e-3)  # 8 windows of 128: 2 batches a step


class Stop(Exception):
    """Stands for a crash or Ctrl-C at a chosen point."""


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    path = tmp_path_factory.mktemp("public") / "public.txt"
    path.write_text(" ".join(f"word{i % 37} and item {i % 11} ." for i in range(800)))
    return path


def _emulate(model, public, out, **kw):
    from offsite_ds.emulator import make_bundle
    from offsite_ds.fitting import FitSettings

    return make_bundle(model, "2-2-2", out, calib_data=public, calib_tokens=256, allow_far=True,
                       fit=FitSettings(**FIT), save_every_s=0, **kw)


def _same_bundle(a, b) -> None:
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.validation import read_manifest

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = read_manifest(a, BUNDLE_FORMAT), read_manifest(b, BUNDLE_FORMAT)
    assert ma.compression == mb.compression and ma.quality == mb.quality and ma.block_map == mb.block_map


@pytest.fixture(scope="module")
def reference(tiny_model_dir, public, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "bundle"
    _emulate(str(tiny_model_dir("llama")), public, out)
    assert not out.with_name("bundle.checkpoints").exists()  # removed once the bundle is written
    return out


# after a fitted block; inside a block's fit; in the KL phase at an epoch's end (2 batches an epoch) and inside one
@pytest.mark.parametrize("stop_at,at_step", [("block-2", None), ("block-5-steps", 1), ("kl-steps", 2), ("kl-steps", 3)])
def test_a_stopped_emulate_resumes_to_the_same_bundle(stop_at, at_step, reference, tiny_model_dir, public, tmp_path,
                                                       monkeypatch):
    from offsite_ds.fitting import FitCheckpoints

    save, load, loaded = FitCheckpoints.save, FitCheckpoints.load, []

    def stopping_save(self, name, state):
        save(self, name, state)
        if name == stop_at and (at_step is None or state["step"] == at_step):
            raise Stop(name)

    def spying_load(self, name):
        state = load(self, name)
        loaded.append((name, None if state is None else state.get("step")))
        return state

    monkeypatch.setattr(FitCheckpoints, "save", stopping_save)
    out = tmp_path / "bundle"
    with pytest.raises(Stop):
        _emulate(str(tiny_model_dir("llama")), public, out)
    assert not out.exists() and (tmp_path / "bundle.checkpoints" / "key.json").is_file()
    monkeypatch.setattr(FitCheckpoints, "save", save)
    monkeypatch.setattr(FitCheckpoints, "load", spying_load)
    lines = []
    _emulate(str(tiny_model_dir("llama")), public, out, log=lines.append)
    assert any(line.startswith("continuing the stopped run kept in") for line in lines), lines
    _same_bundle(reference, out)
    assert ("choice", None) in loaded  # the blocks were not chosen again
    assert any("block 2 (run to" in line and "before the run was resumed" in line for line in lines), lines
    if at_step is not None:
        assert (stop_at, at_step) in loaded  # it went on from the step it had kept
    assert not (tmp_path / "bundle.checkpoints").exists()


def test_sigterm_keeps_the_work_and_the_cli_resumes_it(reference, tiny_model_dir, public, tmp_path, monkeypatch,
                                                        capsys):
    from offsite_ds.cli import main
    from offsite_ds.fitting import FitCheckpoints, FitSettings

    assert FitSettings(**FIT).kl_rank == 8  # the flags below spell the FIT settings
    argv = ["emulate", str(tiny_model_dir("llama")), "--layout", "2-2-2", "--calib-data", str(public),
            "--calib-tokens", "256", "--allow-far", "--no-progress", "--out", str(tmp_path / "bundle"),
            "--fit-tokens", "1024", "--fit-epochs", "2", "--fit-lr", "1e-3",
            "--fit-kl-epochs", "2", "--fit-kl-lr", "1e-3", "--save-every-s", "3600"]
    calls = []

    def signalling_due(self):
        calls.append(1)
        if len(calls) == 5:  # the launcher's SIGTERM, mid-training: saved at the next step boundary
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    monkeypatch.setattr(FitCheckpoints, "due", signalling_due)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 143  # as a preempted `tune` exits
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("SIGTERM: progress saved at step") and "same command again" in err[-1], err
    assert not (tmp_path / "bundle").exists()
    monkeypatch.undo()
    assert main([*argv, "--fit-lr", "2e-3"]) == 2  # another run's settings: its progress is neither used nor lost
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the progress of another emulate run" in err[0], err
    assert main(argv) == 0
    _same_bundle(reference, tmp_path / "bundle")
    assert not (tmp_path / "bundle.checkpoints").exists()


def test_the_guard_keeps_the_fit_and_refusals_name_the_folder(tiny_model_dir, public, tmp_path, capsys):
    from offsite_ds.cli import main

    argv = ["emulate", str(tiny_model_dir("llama")), "--layout", "2-2-2", "--calib-data", str(public),
            "--calib-tokens", "256", "--no-progress", "--fit-tokens", "512", "--fit-epochs", "1", "--fit-kl-epochs",
            "0"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the owner's own file")
    assert main([*argv, "--out", str(tmp_path / "b"), "--checkpoint-dir", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no emulate progress" in err[0], err
    assert (tmp_path / "mine" / "notes.txt").is_file()  # never removed
    # the guard refuses the far emulator after the fit: the fit is kept, and --allow-far writes it from there
    assert main([*argv, "--out", str(tmp_path / "c"), "--guard-ratio", "1.0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "nothing written" in err[0] and "c.checkpoints" in err[0], err
    assert (tmp_path / "c.checkpoints" / "block-2.pt").is_file()
    assert main([*argv, "--out", str(tmp_path / "c"), "--guard-ratio", "1.0", "--allow-far"]) == 0
    assert "continuing the stopped run kept in" in capsys.readouterr().err
    assert (tmp_path / "c" / "offsite.json").is_file() and not (tmp_path / "c.checkpoints").exists()
    assert main([*argv, "--out", str(tmp_path / "d"), "--save-every-s", "-1"]) == 2
    assert "--save-every-s" in capsys.readouterr().err


def test_a_stopped_elimination_goes_on_along_the_same_path(tiny_model_dir, public, tmp_path, monkeypatch):
    from offsite_ds.emulator import make_bundle
    from offsite_ds.fitting import FitCheckpoints

    def emulate(out, **kw):
        return make_bundle(str(tiny_model_dir("llama")), "2-2-2", out, select="iterative", calib_data=public,
                           calib_tokens=256, allow_far=True, fit=None, **kw)

    emulate(tmp_path / "ref")
    save, load, loaded = FitCheckpoints.save, FitCheckpoints.load, []

    def stopping_save(self, name, state):
        save(self, name, state)
        if name == "elimination":
            raise Stop(name)  # after the first removal

    def spying_load(self, name):
        state = load(self, name)
        loaded.append((name, None if state is None else len(state.get("steps", []))))
        return state

    monkeypatch.setattr(FitCheckpoints, "save", stopping_save)
    with pytest.raises(Stop):
        emulate(tmp_path / "b")
    monkeypatch.setattr(FitCheckpoints, "save", save)
    monkeypatch.setattr(FitCheckpoints, "load", spying_load)
    emulate(tmp_path / "b")
    assert ("elimination", 1) in loaded  # the second removal was the only one made again
    _same_bundle(tmp_path / "ref", tmp_path / "b")
