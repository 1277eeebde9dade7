"""Bad input gets one clear line and exit code 2, never a traceback, never a half-written output."""
import json
import subprocess
import sys

import pytest

from offsite_ds.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def bundle(tiny_bundle):
    return tiny_bundle("gpt2")


def test_impossible_layout(capsys, tiny_model_dir, tmp_path):
    code, err = _run(capsys, "emulate", tiny_model_dir("opt"), "--layout", "4-1-4", "--out", tmp_path / "b")
    assert code == 2 and "leave no middle" in err and len(err.splitlines()) == 1
    code, err = _run(capsys, "emulate", tiny_model_dir("opt"), "--layout", "2-9-2", "--out", tmp_path / "b")
    assert code == 2 and "between 1 and the middle's size 4" in err
    assert not (tmp_path / "b").exists()


def test_missing_model_dir(capsys, tmp_path):
    code, err = _run(capsys, "emulate", tmp_path / "nope", "--layout", "2-2-2", "--out", tmp_path / "b")
    assert code == 2 and "not a Hugging Face model directory" in err


def test_unsupported_model_family(tmp_path):
    """An encoder is refused in our one line alone: transformers' advice on building BERT as a decoder is held,
    then dropped (a subprocess: the real stderr, whichever stream transformers' log handler was bound to)."""
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(tmp_path / "bert")
    for argv in (["emulate", str(tmp_path / "bert"), "--layout", "1-1-0", "--out", str(tmp_path / "b")],
                 ["plan", str(tmp_path / "bert"), "--gpus", "1"]):  # the streamed checkpoint, the shape table
        proc = subprocess.run([sys.executable, "-m", "offsite_ds", *argv], capture_output=True, text=True)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err
        assert "model type 'bert' is not supported" in err and "is_decoder" not in err
    assert not (tmp_path / "b").exists()


def test_missing_data_file(capsys, bundle, tmp_path):
    code, err = _run(capsys, "tune", bundle, "--data", tmp_path / "missing.txt", "--out", tmp_path / "a",
                     "--seq-len", "32")
    assert code == 2 and "missing.txt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_empty_corpus_and_missing_field(capsys, bundle, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    code, err = _run(capsys, "tune", bundle, "--data", tmp_path / "empty.txt", "--out", tmp_path / "a", "--seq-len", "32")
    assert code == 2 and "corpus is empty" in err
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    code, err = _run(capsys, "tune", bundle, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "a", "--seq-len", "32")
    assert code == 2 and "no field 'text'" in err and "--text-field" in err


def test_seq_len_beyond_positions(capsys, bundle, corpus_file, tmp_path):
    code, err = _run(capsys, "tune", bundle, "--data", corpus_file, "--out", tmp_path / "a", "--seq-len", "4096")
    assert code == 2 and "exceeds the model's 128 positions" in err


def test_bundle_passed_as_model_and_bad_mode_settings(capsys, bundle, corpus_file, tmp_path):
    code, err = _run(capsys, "tune", tmp_path, "--data", corpus_file, "--out", tmp_path / "a")
    assert code == 2 and "no offsite.json" in err
    code, err = _run(capsys, "tune", bundle, "--data", corpus_file, "--out", tmp_path / "a", "--mode", "lora",
                     "--lora-targets", "no_such_proj", "--steps", "1", "--seq-len", "16")
    assert code == 2 and "LoRA targets" in err


def test_bitfit_on_a_family_without_biases(capsys, tiny_bundle, corpus_file, tmp_path):
    bundle = tiny_bundle("llama")
    code, err = _run(capsys, "tune", bundle, "--data", corpus_file, "--out", tmp_path / "a", "--mode", "bitfit",
                     "--seq-len", "32")
    assert code == 2 and "have none" in err


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "offsite_ds", "plugin", str(tmp_path), str(tmp_path / "x"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
