"""lm-eval 0.4 through HFLM(pretrained=model object): local tasks of each output type, offline errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from offsite_ds.errors import DataError
from offsite_ds.lm_eval_bridge import (CHOICE_PROMPT, SHIPPED_TASKS, TaskLoader, load_tasks, place_model,
                                       read_choice_records, run_tasks)
from offsite_ds.tiny import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def gpt2():
    # 512 positions: every shipped prose paragraph fits one window, so lm-eval scores it in one pass
    return tiny_model("gpt2", n_layers=2, max_positions=512), byte_tokenizer()


def test_shipped_tasks_cover_each_output_type(gpt2):
    model, tok = gpt2
    results = run_tasks(model, tok, "mmlu_demo,qa_demo,prose_demo", limit=3, batch_size=2)
    assert set(results) == {"mmlu_demo", "qa_demo", "prose_demo"}
    mc, gen, ppl = results["mmlu_demo"], results["qa_demo"], results["prose_demo"]
    assert (mc["output_type"], mc["metric"], mc["n_samples"], mc["n_docs"]) == ("multiple_choice", "acc", 3, 320)
    assert 0.0 <= mc["value"] <= 1.0 and mc["higher_is_better"] is True and "acc_norm" in mc["metrics"]
    assert (gen["output_type"], gen["metric"], gen["n_samples"]) == ("generate_until", "exact_match", 3)
    assert 0.0 <= gen["value"] <= 1.0
    assert (ppl["output_type"], ppl["metric"], ppl["higher_is_better"]) == ("loglikelihood_rolling",
                                                                            "word_perplexity", False)
    assert ppl["value"] > 1.0 and ppl["metrics"]["byte_perplexity"] > 1.0


def test_rolling_perplexity_is_the_given_model_object(gpt2):
    """lm-eval's byte perplexity equals the one computed by hand from this very model (byte tokenizer:
    one token per byte), each document conditioned on the EOS/BOS prefix token as lm-eval does."""
    model, tok = gpt2
    docs = [json.loads(line)["text"] for line in (SHIPPED_TASKS / "prose_demo.jsonl").read_text().splitlines()][:3]
    result = run_tasks(model, tok, ["prose_demo"], limit=3)["prose_demo"]
    nll, n_bytes = 0.0, 0
    with torch.no_grad():
        for text in docs:
            ids = torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])
            logits = model(ids).logits[0, :-1]
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n_bytes += len(text.encode())
    assert result["metrics"]["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)


def test_shipped_choice_task_uses_the_json_prompt():
    cfg = yaml.safe_load((SHIPPED_TASKS / "mmlu_demo.yaml").read_text())
    assert cfg["doc_to_text"] == CHOICE_PROMPT and cfg["output_type"] == "multiple_choice"
    records = read_choice_records(SHIPPED_TASKS / "mmlu_demo_test.jsonl")
    assert len(records) == 320 and all(0 <= r["answer"] < len(r["choices"]) == 4 for r in records)


def test_json_choice_file_is_a_task(gpt2, tmp_path):
    model, tok = gpt2
    path = tmp_path / "mine.jsonl"
    rows = [{"question": "2+2?", "choices": ["3", "4"], "answer": 1},
            {"question": "Sky colour?", "choices": ["blue", "red", "green"], "answer": "A"},
            {"question": "Cats say?", "choices": ["woof", "meow"], "answer": "meow"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["answer"] for r in read_choice_records(path)] == [1, 0, 1]
    result = run_tasks(model, tok, [str(path)])["mine"]
    assert result["n_samples"] == 3 and result["output_type"] == "multiple_choice"
    # the reported accuracy is the argmax of the choices' log-likelihoods, recomputed here by hand
    correct = 0
    with torch.no_grad():
        for r in read_choice_records(path):
            context = CHOICE_PROMPT.replace("{{question}}", r["question"])
            scores = []
            for choice in r["choices"]:
                ctx, cont = tok.encode(context), tok.encode(" " + choice)
                ids = torch.tensor([ctx + cont])
                logp = F.log_softmax(model(ids).logits[0, :-1], -1)
                scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    assert result["value"] == pytest.approx(correct / 3)


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "choices": ["a"], "answer": 0}\n', "at least two"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}\n', "outside the 2 choices"),
    ('{"question": "q", "choices": ["a", "b"]}\n', "needs 'question'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}\nnot json\n', ":2: not valid JSON"),
])
def test_bad_choice_file_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_tasks([str(path)])
    assert "\n" not in str(info.value)


def test_local_yaml_with_relative_data_files(gpt2, tmp_path, monkeypatch):
    model, tok = gpt2
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "facts.jsonl").write_text(json.dumps({"q": "Is ice cold?", "opts": ["yes", "no"], "gold": 0}) + "\n")
    (folder / "facts.yaml").write_text(
        "task: my_facts\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: facts.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: opts\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    monkeypatch.chdir(tmp_path)  # not the YAML's folder: the relative data file must still be found
    by_name = run_tasks(model, tok, ["my_facts"], include_path=[str(folder)])
    by_path = run_tasks(model, tok, [str(folder / "facts.yaml")])
    assert by_name["my_facts"]["n_samples"] == by_path["my_facts"]["n_samples"] == 1
    assert by_name["my_facts"]["value"] == by_path["my_facts"]["value"]


def test_task_names_that_cannot_load_offline_say_what_to_do(gpt2, tmp_path):
    model, tok = gpt2
    loader = TaskLoader()
    with pytest.raises(DataError) as info:
        loader.load("piqa")  # a real lm-eval task whose dataset is on the Hub: offline in tests
    message = str(info.value)
    assert "\n" not in message and "'piqa'" in message and "--include-path" in message
    with pytest.raises(DataError, match="unknown task 'no_such_task_xyz'"):
        loader.load("no_such_task_xyz")
    with pytest.raises(DataError, match="no such directory"):
        load_tasks(["mmlu_demo"], include_path=[str(tmp_path / "missing")])


def test_device_map_auto_keeps_the_model_equal():
    model = tiny_model("llama", n_layers=2)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
        placed = place_model(model, device="cpu", dtype="fp32", device_map="auto")
        after = placed(ids).logits
    torch.testing.assert_close(before, after)
