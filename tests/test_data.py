import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from offsite_ds.data import BlockLoader, load_texts, pack_blocks
from offsite_ds.errors import DataError
from offsite_ds.evaluate import _windows, perplexity
from offsite_ds.tiny import byte_tokenizer, tiny_model


def test_all_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x y", "z"]))
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"body": "b1"}, {"body": "b2"}]}))
    pq.write_table(pa.table({"text": ["p1", "p2", None]}), tmp_path / "a.parquet")
    assert load_texts(tmp_path / "a.txt") == ["line one\nline two\n"]
    assert load_texts(tmp_path / "a.jsonl") == ["x y", "z"]
    assert load_texts(tmp_path / "a.json", text_field="body") == ["b1", "b2"]
    assert load_texts(tmp_path / "a.parquet") == ["p1", "p2"]


def test_bad_inputs(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "a.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        load_texts(tmp_path / "a.csv")
    pq.write_table(pa.table({"body": ["p"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="no column 'text'"):
        load_texts(tmp_path / "b.parquet")
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(["hi"], byte_tokenizer(), 64)


def test_packing_joins_documents_with_eos():
    tok = byte_tokenizer()
    blocks = pack_blocks(["ab", "cd"], tok, 3)
    a, b, c, d = (tok.convert_tokens_to_ids(ch) for ch in "abcd")
    assert blocks.tolist() == [[a, b, tok.eos_token_id], [c, d, tok.eos_token_id]]


def test_loader_order_is_a_function_of_seed_and_epoch():
    blocks = torch.arange(40).view(20, 2)
    a, b = BlockLoader(blocks, 4, seed=1), BlockLoader(blocks, 4, seed=1)
    assert torch.equal(a.batch(3, 2)["input_ids"], b.batch(3, 2)["input_ids"])
    epoch0 = torch.cat([a.batch(0, i)["input_ids"] for i in range(len(a))])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 40, 2)), "an epoch sees every block once"
    r0, r1 = BlockLoader(blocks, 2, seed=1, rank=0, world_size=2), BlockLoader(blocks, 2, seed=1, rank=1, world_size=2)
    seen0 = {int(x) for i in range(len(r0)) for x in r0.batch(0, i)["input_ids"][:, 0]}
    seen1 = {int(x) for i in range(len(r1)) for x in r1.batch(0, i)["input_ids"][:, 0]}
    assert not seen0 & seen1, "ranks read disjoint blocks"


def test_sliding_windows_score_every_token_once():
    windows = _windows(100, 32, 16)
    assert sum(scored for _, _, scored in windows) == 100
    assert all(end - begin <= 32 for begin, end, _ in windows)


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    model = tiny_model("gpt2", n_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # all logits equal -> perplexity == vocabulary size
    ppl = perplexity(model, byte_tokenizer(), ["some text " * 20], seq_len=32, stride=16)
    assert ppl == pytest.approx(model.config.vocab_size, rel=1e-4)
