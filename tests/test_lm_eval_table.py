"""The paper's five-row table, end to end on a tiny OPT round trip (emulate -> tune -> eval-table)."""
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from offsite_ds.cli import main
from offsite_ds.errors import ArtifactError
from offsite_ds.eval_table import PRIVACY_GAP, ROW_FILES, ROWS, TUNING_GAIN, EvalOptions, eval_table
from offsite_ds.lm_eval_bridge import run_tasks

TASKS = "mmlu_demo,qa_demo,prose_demo"


@pytest.fixture
def round_trip(tiny_round_trip):
    """The shared tiny round trip; its plugged-in model (a plain HF dir) doubles as the FT row: its numbers must
    equal OT Plug-in's."""
    return tiny_round_trip


def test_five_row_table_from_the_cli(round_trip, tmp_path):
    rt = round_trip
    out = tmp_path / "table"
    code = main(["eval-table", "--model", str(rt["model"]), "--bundle", str(rt["bundle"]), "--adapter",
                 str(rt["adapter"]), "--ft", str(rt["plugged"]), "--tasks", TASKS, "--ppl-data", str(rt["corpus"]),
                 "--max-tokens", "400", "--limit", "3", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    table = json.loads((out / "table.json").read_text())
    assert list(table["rows"]) == list(ROWS)
    assert [c["key"] for c in table["columns"]] == ["mmlu_demo", "qa_demo", "prose_demo", "ppl"]
    rows = {row: json.loads((out / ROW_FILES[row]).read_text()) for row in ROWS}
    assert all(r["tasks"]["mmlu_demo"]["n_samples"] == 3 for r in rows.values())

    grid = table["rows"]
    assert grid["FT"] == grid["OT Plug-in"], "the plug-in row is the plugged model, evaluated as exported"
    assert grid["OT Emulator"]["prose_demo"] != grid["Emulator zero-shot"]["prose_demo"], "adapter applied"
    assert grid["OT Plug-in"]["ppl"] != grid["Full zero-shot"]["ppl"]
    assert grid["Full zero-shot"]["ppl"] != grid["Emulator zero-shot"]["ppl"]
    for column in table["columns"]:
        key = column["key"]
        assert table["gaps"][PRIVACY_GAP][key] == pytest.approx(grid["OT Plug-in"][key] - grid["OT Emulator"][key])
        assert table["gaps"][TUNING_GAIN][key] == pytest.approx(grid["OT Plug-in"][key] - grid["Full zero-shot"][key])

    markdown = (out / "table.md").read_text()
    lines = markdown.splitlines()
    assert lines[0].startswith("| Setting | mmlu_demo | qa_demo | prose_demo (↓) | PPL train.txt (↓) |")
    assert "2-2-2 Layer-drop" in lines[2]
    for row in ROWS + (PRIVACY_GAP, TUNING_GAIN):
        assert any(line.startswith(f"| {row} |") or line.startswith(f"| *{row}* |") for line in lines), row
    worst = max(e for r in table["stderr"].values() for k, e in r.items() if k == "mmlu_demo")
    assert f"up to ±{100 * worst:.1f} pp" in markdown
    full_zs = next(line for line in lines if line.startswith("| Full zero-shot |"))
    assert f"{100 * grid['Full zero-shot']['mmlu_demo']:.1f}%" in full_zs


def test_rows_evaluate_the_shipped_artifacts_themselves(round_trip, tmp_path):
    """Emulator zero-shot is the bundle as plain transformers loads it; Full zero-shot the owner's model."""
    rt = round_trip
    table = eval_table(rt["model"], rt["bundle"], rt["adapter"], tmp_path / "t",
                       EvalOptions(tasks=["prose_demo"], limit=2), log=lambda _: None)
    tok = AutoTokenizer.from_pretrained(rt["model"])
    for row, directory in (("Emulator zero-shot", rt["bundle"]), ("Full zero-shot", rt["model"]),
                           ("OT Plug-in", rt["plugged"])):
        direct = run_tasks(AutoModelForCausalLM.from_pretrained(directory), tok, ["prose_demo"], limit=2)
        assert table["rows"][row]["prose_demo"] == pytest.approx(direct["prose_demo"]["value"]), row
    assert "FT" not in table["rows"]


def test_adapter_from_another_bundle_is_refused_before_evaluating(round_trip, tiny_bundle, tmp_path):
    rt = round_trip
    other = tiny_bundle("opt", "1-2-1")
    with pytest.raises(ArtifactError, match="another emulator bundle"):
        eval_table(rt["model"], other, rt["adapter"], tmp_path / "t", EvalOptions(tasks=["mmlu_demo"]))
    assert not (tmp_path / "t").exists()


def test_nothing_to_evaluate_is_one_line(round_trip, tmp_path, capsys):
    rt = round_trip
    code = main(["eval-table", "--model", str(rt["model"]), "--bundle", str(rt["bundle"]), "--adapter",
                 str(rt["adapter"]), "--out", str(tmp_path / "t")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tasks" in err


def test_eval_command_accepts_tasks(round_trip, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(round_trip["bundle"]), "--tasks", "mmlu_demo", "--limit", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tasks"]["mmlu_demo"]["n_samples"] == 2
