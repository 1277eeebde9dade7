"""Task-format tuning data: the evaluation's prompt, masked out token by token, padded per batch."""
import json

import pytest
import torch

from offsite_ds.cli import main
from offsite_ds.errors import DataError
from offsite_ds.lm_eval_bridge import SHIPPED_TASKS, load_tasks, read_choice_records
from offsite_ds.task_data import (IGNORE_INDEX, ExampleLoader, encode_pair, prompt_and_answer, task_examples,
                                  task_loader)
from offsite_ds.tiny import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE with real merges (so moving a space across the split matters), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["question"] + " " + " ".join(r["choices"]) for r in read_choice_records(SHIPPED_TASKS / "mmlu_demo_train.jsonl")]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", bos_token="<eos>", pad_token="<eos>")


def test_prompt_is_masked_token_by_token(tok):
    records = read_choice_records(SHIPPED_TASKS / "mmlu_demo_train.jsonl")[:5]
    examples = task_examples("mmlu_demo", tok, split="train", limit=5)
    assert len(examples) == 5
    for record, example in zip(records, examples):
        prompt = f"Question: {record['question']}\nAnswer:"
        answer = " " + record["choices"][record["answer"]]
        ids, labels = example["input_ids"], example["labels"]
        assert tok.decode(ids) == prompt + answer
        n_prompt = len(tok.encode(prompt))
        assert len(labels) == len(ids) == n_prompt + len(tok.encode(answer))
        for i, (token, label) in enumerate(zip(ids, labels)):
            assert label == (IGNORE_INDEX if i < n_prompt else token), f"token {i}"


def test_training_prompts_are_the_evaluation_requests(tok):
    """On the test split, each example's (prompt, answer) is exactly the gold request lm-eval scores."""
    task = load_tasks(["mmlu_demo"])["mmlu_demo"]
    task.build_all_requests(limit=4)
    gold = {}
    for inst in task.instances:
        doc_id = inst.doc_id
        if inst.idx == inst.doc["answer"]:
            gold[doc_id] = inst.arguments
    examples = task_examples(task, tok, split="test", limit=4)
    for doc_id, (context, continuation) in sorted(gold.items()):
        ids, labels = examples[doc_id]["input_ids"], examples[doc_id]["labels"]
        n_prompt = labels.count(IGNORE_INDEX)
        assert tok.decode(ids[:n_prompt]) == context and tok.decode(ids[n_prompt:]) == continuation


def test_encode_pair_splits_like_lm_eval(bpe_tokenizer):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny_model("opt", n_layers=1, vocab=bpe_tokenizer.vocab_size), tokenizer=bpe_tokenizer)
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"),
             ("The answer is ", "national marketing"),  # trailing space moves to the continuation
             ("Question: which nutrient", " carbohydrates and proteins")]
    for context, continuation in pairs:
        assert encode_pair(bpe_tokenizer, context, continuation) == lm._encode_pair(context, continuation)
    ctx, cont = encode_pair(bpe_tokenizer, "", "rolling text")
    assert ctx == [lm.prefix_token_id] and cont == bpe_tokenizer.encode("rolling text", add_special_tokens=False)


def test_generation_answer_ends_with_the_stop_sequence(tok):
    task = load_tasks(["qa_demo"])["qa_demo"]
    doc = task.training_docs()[0]
    assert prompt_and_answer(task, doc) == ("Question: What is the capital of France?\nAnswer:", " Paris\n")
    example = task_examples(task, tok, limit=1)[0]
    scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(scored) == " Paris\n"


def test_rolling_task_scores_the_whole_document(tok):
    example = task_examples("prose_demo", tok, split="test", limit=1)[0]
    assert example["input_ids"][0] == tok.bos_token_id and example["labels"][0] == IGNORE_INDEX
    assert example["labels"][1:] == example["input_ids"][1:]


def test_missing_split_names_the_ones_there(tok):
    with pytest.raises(DataError, match="no train split; pass --task-split test"):
        task_examples("prose_demo", tok, split="train")


def test_long_examples_keep_the_answer(tok):
    example = task_examples("mmlu_demo", tok, limit=1, max_length=12)[0]
    assert len(example["input_ids"]) == 12
    full = task_examples("mmlu_demo", tok, limit=1)[0]
    assert example["input_ids"] == full["input_ids"][-12:] and example["labels"] == full["labels"][-12:]


def test_batches_are_padded_per_batch_and_reproducible(tok):
    examples = [{"input_ids": list(range(1, n + 1)), "labels": [IGNORE_INDEX] * (n - 1) + [n]} for n in range(2, 12)]
    loader = ExampleLoader(examples, batch_size=3, pad_id=0, seed=7)
    widths = set()
    for index in range(len(loader)):
        batch = loader.batch(0, index)
        members = [examples[i] for i in loader.batch_indices(0, index).tolist()]
        width = max(len(e["input_ids"]) for e in members)
        widths.add(width)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
        for row, e in enumerate(members):
            n = len(e["input_ids"])
            assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
            assert batch["labels"][row, :n].tolist() == e["labels"]
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == 0).all()
    assert len(widths) > 1, "each batch pads to its own longest example"
    again = ExampleLoader(examples, batch_size=3, pad_id=0, seed=7)
    assert all(torch.equal(loader.batch(1, i)["input_ids"], again.batch(1, i)["input_ids"]) for i in range(len(loader)))
    ranks = [set(ExampleLoader(examples, 2, 0, seed=7, rank=r, world_size=2).batch_indices(0, 0).tolist())
             for r in (0, 1)]
    assert not ranks[0] & ranks[1]


def test_loader_for_a_json_file_and_too_few_examples(tok, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(4)))
    loader = task_loader(str(path), tok, batch_size=2)
    batch = loader.batch(0, 0)
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] != IGNORE_INDEX).any()
    with pytest.raises(DataError, match="only 4 task examples"):
        task_loader(str(path), tok, batch_size=8)


def test_tune_cli_trains_on_a_task(tiny_bundle, tmp_path):
    from offsite_ds.adapter_package import load_adapter_package

    bundle = tiny_bundle("opt")
    code = main(["tune", str(bundle), "--task", "mmlu_demo", "--out", str(tmp_path / "adapter"), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "128", "--max-examples", "8", "--no-progress"])
    assert code == 0
    package = load_adapter_package(tmp_path / "adapter")
    assert package.manifest.training["steps"] == 2
    assert main(["tune", str(bundle), "--out", str(tmp_path / "x")]) == 2  # neither --data nor --task
