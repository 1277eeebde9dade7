"""The owner's lr probe: it scores each lr by the plug-in on public held-out text, records the best in the bundle
(outside its fingerprint), `tune` uses it when given no --lr, a hostile advice is refused, and it resumes."""
import json
import shutil

import pytest

from offsite_ds.adapter_package import load_adapter_package
from offsite_ds.cli import main
from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.lr_probe import ProbeSettings, choose_lr, probe_lr
from offsite_ds.roles.tune_adapter import DEFAULT_TUNE_LR, tune
from offsite_ds.train import TrainConfig
from offsite_ds.validation import read_manifest

TINY = dict(steps=4, batch_size=2, seq_len=32, eval_tokens=512, eval_seq_len=64)


@pytest.fixture
def probed(tiny_model_dir, tiny_bundle, corpus_file, tmp_path):
    """A copy of the tiny OPT bundle probed at a useless, a useful and a harmful lr (work kept for resume)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("opt"), bundle)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(corpus_file.read_text()[:3000])
    advice = probe_lr(tiny_model_dir("opt"), bundle, corpus_file, heldout, ProbeSettings(lrs=(1e-2, 1e-6, 1.0), **TINY),
                      work_dir=tmp_path / "work", log=lambda *_: None)
    assert read_manifest(bundle, "offsite-ds.emulator-bundle").advised_lr("full") == advice["lr"]
    return {"bundle": bundle, "heldout": heldout, "advice": advice, "work": tmp_path / "work"}


def _points(*pairs):
    return [{"lr": lr, "plugin_ppl": ppl} for lr, ppl in pairs]


def test_the_advice_is_the_largest_lr_within_the_tolerance():
    # SmolLM2-135M on public Wikipedia, 2026-12-05: the importance emulator's plug-ins, then the fitted one's
    importance = _points((1e-4, 29.70), (3e-4, 32.02), (1e-3, 39.34), (3e-3, 58.87))
    assert choose_lr(importance, 29.68, 1.2) == 3e-4
    assert choose_lr(_points((1e-4, 29.05), (3e-4, 29.29), (1e-3, 31.60), (3e-3, 45.56)), 29.68, 1.2) == 1e-3
    assert choose_lr(importance, 29.68, 1.0) == 1e-4  # none within: the smallest
    assert choose_lr(_points((1e-3, 40.0), (1e-4, 31.0), (3e-4, 20.0)), 29.68, 1.2) == 3e-4  # order-free


def test_the_probe_records_its_choice_in_the_bundle(probed, tiny_bundle):
    advice = probed["advice"]
    by_lr = {p["lr"]: p["plugin_ppl"] for p in advice["points"]}
    assert list(by_lr) == [1e-6, 1e-2, 1.0]  # probed in order
    assert by_lr[1e-2] < advice["full_ppl"]  # tuning on the text helps the plug-in; 1e-6 changes nothing
    assert abs(by_lr[1e-6] / advice["full_ppl"] - 1) < 1e-3
    assert advice["lr"] == choose_lr(advice["points"], advice["full_ppl"], advice["tolerance"])
    manifest = read_manifest(probed["bundle"], "offsite-ds.emulator-bundle")
    assert manifest.advised_lr("full") == advice["lr"] and manifest.advised_lr("lora") is None
    # the advice does not change what the data owner receives: the fingerprint covers the files
    assert manifest.fingerprint == read_manifest(tiny_bundle("opt"), "offsite-ds.emulator-bundle").fingerprint


def test_tune_without_an_lr_takes_the_advice_for_its_mode(probed, corpus_file, tmp_path, capsys):
    cfg = TrainConfig(steps=1, batch_size=2, lr=None, progress=False)
    tune(probed["bundle"], corpus_file, tmp_path / "a", seq_len=32, cfg=cfg)
    training = load_adapter_package(tmp_path / "a").manifest.training
    assert (training["lr"], training["lr_from"]) == (probed["advice"]["lr"], "probe")
    assert f"lr {probed['advice']['lr']:g} (the owner's probe" in capsys.readouterr().err
    tune(probed["bundle"], corpus_file, tmp_path / "l", mode="lora", seq_len=32, cfg=cfg)  # no advice for lora
    training = load_adapter_package(tmp_path / "l").manifest.training
    assert (training["lr"], training["lr_from"]) == (DEFAULT_TUNE_LR, "default")
    main(["tune", str(probed["bundle"]), "--data", str(corpus_file), "--out", str(tmp_path / "g"), "--steps", "1",
          "--batch-size", "2", "--seq-len", "32", "--lr", "3e-4", "--no-progress"])
    training = load_adapter_package(tmp_path / "g").manifest.training
    assert (training["lr"], training["lr_from"]) == (3e-4, "given")


def test_an_interrupted_probe_resumes_from_its_kept_results(probed, tiny_model_dir, corpus_file, monkeypatch):
    import offsite_ds.roles.tune_adapter as role

    def no_tuning(*a, **k):
        raise AssertionError("a probed lr was tuned again")

    monkeypatch.setattr(role, "tune", no_tuning)
    again = probe_lr(tiny_model_dir("opt"), probed["bundle"], corpus_file, probed["heldout"],
                     ProbeSettings(lrs=(1e-2, 1e-6, 1.0), **TINY), work_dir=probed["work"], log=lambda *_: None)
    assert again["points"] == probed["advice"]["points"]
    with pytest.raises(OffsiteError, match="holds a probe of another bundle, text or settings"):  # not reused
        probe_lr(tiny_model_dir("opt"), probed["bundle"], corpus_file, probed["heldout"],
                 ProbeSettings(lrs=(1e-2,), **{**TINY, "steps": 5}), work_dir=probed["work"], log=lambda *_: None)


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update(lr=0.5), "not one of the probed points"),
    (lambda a: a.update(lr=2.0, points=[{"lr": 2.0, "plugin_ppl": 1.0}]), "less than or equal to 1"),
    (lambda a: a.update(points=[{"lr": 1e-2, "plugin_ppl": 1.0}] * 17), "at most 16"),
    (lambda a: a.update(mode="sideways"), "mode"),
    (lambda a: a.update(tolerance=0.5), "greater than or equal to 1"),
    (lambda a: a.update(extra=1), "extra"),
])
def test_a_hostile_advice_is_refused(probed, edit, message):
    path = probed["bundle"] / "offsite.json"
    raw = json.loads(path.read_text())
    edit(raw["advice"])
    path.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(probed["bundle"], "offsite-ds.emulator-bundle")


def test_bad_probe_input_is_one_line(tiny_model_dir, tiny_bundle, corpus_file, tmp_path, capsys):
    with pytest.raises(OffsiteError, match="distinct"):
        ProbeSettings(lrs=(1e-3, 1e-3))
    with pytest.raises(OffsiteError, match=r"in \(0, 1\]"):
        ProbeSettings(lrs=(-1e-3,))
    with pytest.raises(OffsiteError, match="--tolerance 0.9 must be >= 1"):
        ProbeSettings(tolerance=0.9)
    code = main(["probe-lr", str(tiny_model_dir("opt")), str(tiny_bundle("opt")), "--public", str(corpus_file)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--heldout FILE" in err and len(err.splitlines()) == 1
    code = main(["probe-lr", str(tiny_model_dir("opt")), str(tmp_path), "--public", str(corpus_file),
                 "--heldout", str(corpus_file)])
    assert code == 2 and "offsite.json" in capsys.readouterr().err


def test_cli_defaults_are_the_probe_settings():
    import inspect

    from offsite_ds.cli import build_parser

    args = build_parser(only="probe-lr").parse_args(["probe-lr", "m", "b"])
    d = ProbeSettings()
    assert (tuple(args.lrs), args.mode, args.steps, args.batch_size, args.seq_len, args.eval_tokens,
            args.tolerance) == (d.lrs, d.mode, d.steps, d.batch_size, d.seq_len, d.eval_tokens, d.tolerance)
    assert args.public == inspect.signature(probe_lr).parameters["public"].default
    tune_args = build_parser(only="tune").parse_args(["tune", "b", "--out", "a"])
    assert tune_args.lr is None  # the bundle's advice, else DEFAULT_TUNE_LR, as tune() without a cfg


def test_the_probe_hashes_the_bundle_once_per_lr_plus_once(tiny_model_dir, tiny_bundle, corpus_file, tmp_path,
                                                           monkeypatch):
    """check_bundle hashes every shard (minutes for a 7B owner): once up front, then once per lr in `tune` (the
    data owner's own check); the plug-in reuses the probe's checked manifest."""
    import offsite_ds.bundle as bundle_module

    calls = []
    real = bundle_module.check_bundle
    monkeypatch.setattr(bundle_module, "check_bundle", lambda *a, **k: calls.append(a) or real(*a, **k))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("opt"), bundle)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(corpus_file.read_text()[:3000])
    probe_lr(tiny_model_dir("opt"), bundle, corpus_file, heldout, ProbeSettings(lrs=(1e-2, 1e-3), **TINY),
             log=lambda *_: None)
    assert len(calls) == 1 + 2
