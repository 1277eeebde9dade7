"""Corpora -> packed token blocks -> batches the one training loop consumes.

Local files (.txt, .json/.jsonl with a text field, .parquet) always work offline; a `datasets` name
(`name[:config][@split]`) works when online. The loader's order is a pure function of (seed, epoch), so
a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from offsite_ds.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")


def _texts_from_records(records: list, field: str, where: str) -> list[str]:
    if not records:
        return []
    if all(isinstance(r, str) for r in records):
        return list(records)
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{where}: expected a list of objects with a '{field}' field")
    if field not in records[0]:
        keys = ", ".join(sorted(records[0])[:8])
        raise DataError(f"{where}: records have no field '{field}' (fields: {keys}); pass --text-field NAME")
    return [str(r.get(field) or "") for r in records]


def read_json_records(path: str | Path) -> list[tuple[str, object]]:
    """Records of a .jsonl file (one per line) or a .json list (or {"data": [...]}), each with where it
    came from ("file:line" / "file record n") so errors about a record can point at it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})")
        return rows
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})")
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    return [(f"{path} record {n}", r) for n, r in enumerate(obj, 1)]


def load_texts(source: str | Path, text_field: str = "text") -> list[str]:
    """Read a corpus into a list of documents."""
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise DataError(f"{path} is a directory; pass a .txt, .json, .jsonl or .parquet file")
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            texts = [path.read_text(encoding="utf-8", errors="replace")]
        elif suffix in (".jsonl", ".json"):
            texts = _texts_from_records([r for _, r in read_json_records(path)], text_field, str(path))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise DataError(f"{path}: no column '{text_field}' (columns: {', '.join(table.column_names[:8])}); "
                                "pass --text-field NAME")
            texts = [str(x or "") for x in table.column(text_field).to_pylist()]
        else:
            raise DataError(f"{path}: unsupported file type '{suffix}'; use .txt, .json, .jsonl or .parquet")
    else:
        texts = _load_hub_dataset(str(source), text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{source}: the corpus is empty; give a file with text in it")
    return texts


def _load_hub_dataset(spec: str, text_field: str) -> list[str]:
    """`name[:config][@split]` through `datasets`, only when the user named something that is not a file."""
    if "/" not in spec and ":" not in spec and "@" not in spec and "." in Path(spec).name:
        raise DataError(f"{spec}: no such file")
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # offline, unknown name, ...: one line, with the fix
        raise DataError(f"cannot load '{spec}' as a file or a datasets name ({str(exc).splitlines()[0][:160]}); "
                        "pass a local .txt/.json/.jsonl/.parquet file when offline")
    if text_field not in ds.column_names:
        raise DataError(f"dataset '{spec}' has no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
                        "pass --text-field NAME")
    return [str(x or "") for x in ds[text_field]]


def tokenize_corpus(texts: list[str], tokenizer) -> torch.Tensor:
    """One long id stream: documents joined by EOS (as in pre-training), so blocks cross document borders."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for doc in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            if eos is not None:
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):  # MPT: max_seq_len (its ALiBi table)
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None  # BLOOM's ALiBi has no hard limit


def start_token_id(tokenizer) -> int | None:
    """The token a model is conditioned on where there is no text yet: BOS, else EOS (None: neither)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def window_len(seq_len: int, config) -> int:
    """`seq_len`, or the model's positions where it has fewer (ALiBi models have no limit)."""
    limit = max_positions(config)
    return min(seq_len, limit) if limit else seq_len


def check_seq_len(seq_len: int, config) -> None:
    limit = max_positions(config)
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len} is too short; use at least 2 tokens")
    if limit is not None and seq_len > limit:
        raise DataError(f"--seq-len {seq_len} exceeds the model's {limit} positions; use --seq-len {limit} or less")


def pack_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenise and cut into [n_blocks, seq_len]; the tail shorter than a block is dropped."""
    ids = tokenize_corpus(texts, tokenizer)
    n_blocks = ids.numel() // seq_len
    if n_blocks == 0:
        raise DataError(f"the corpus has {ids.numel()} tokens, fewer than one block of --seq-len {seq_len}; "
                        "add text or lower --seq-len")
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)


def corpus_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


class BlockLoader:
    """Batches of packed blocks; shuffled per epoch by (seed, epoch), so position k is reproducible."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"--batch-size {batch_size} must be >= 1")
        self.blocks, self.batch_size, self.shuffle, self.seed = blocks, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        per_rank = len(blocks) // world_size
        if per_rank < batch_size:
            raise DataError(f"only {len(blocks)} blocks for {world_size} rank(s) x batch size {batch_size}; "
                            "add data, lower --batch-size or --seq-len")
        self.batches_per_epoch = per_rank // batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch_indices(self, epoch: int, index: int) -> torch.Tensor:
        """Which items make batch `index` of `epoch` on this rank (disjoint slices of one permutation)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.blocks), generator=g)
        else:
            order = torch.arange(len(self.blocks))
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return mine[index * self.batch_size:(index + 1) * self.batch_size]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch `index` of `epoch` for this rank."""
        ids = self.blocks[self.batch_indices(epoch, index)]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Endless (micro_step, batch) from `start_step` on, epoch after epoch."""
        step = start_step
        while True:
            epoch, index = divmod(step, self.batches_per_epoch)
            yield step, self.batch(epoch, index)
            step += 1


def load_blocks(source: str | Path, tokenizer, seq_len: int, text_field: str = "text",
                max_blocks: int | None = None) -> tuple[torch.Tensor, str]:
    """Corpus -> packed blocks plus the corpus fingerprint (recorded in manifests)."""
    texts = load_texts(source, text_field)
    blocks = pack_blocks(texts, tokenizer, seq_len)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    return blocks, corpus_fingerprint(texts)
