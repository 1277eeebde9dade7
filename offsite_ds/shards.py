"""Safetensors checkpoints tensor by tensor: read one tensor at a time, write one tensor at a time.

Why not `safe_open`: it memory-maps each shard, and every page a read touches stays resident (and counted)
for as long as the shard is open, so reading a 5 GB shard costs 5 GB of RSS; and `save_file` serialises a
whole shard in memory. Here a tensor is read with one `readinto` straight into its own buffer, and the
writer, given the plan (names, shapes, dtypes: known before any weight is read), writes each shard's
header first and then each tensor's bytes as it comes, so both hold one tensor at a time. The format is the public one
(8-byte little-endian header length, a JSON header of dtype/shape/data_offsets, the raw bytes); the header
is checked like any untrusted input. Sharded checkpoints follow Hugging Face's layout:
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (weight_map: tensor -> shard).
"""
from __future__ import annotations

import json
import math
import os
import copy
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.formats import (MAX_HEADER_BYTES, SAFETENSORS_TORCH, SINGLE_WEIGHTS, TORCH_SAFETENSORS, WEIGHTS_INDEX,
                                shard_name)

DEFAULT_SHARD_BYTES = 1 << 30


def _read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, {name: {dtype, shape, data_offsets}}) of one safetensors file, checked
    by the artifacts' own header parser (lengths, dtypes, spans inside the file, no gap or overlap)."""
    from offsite_ds.artifact_files import parse_safetensors_header

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ArtifactError(f"{path} is not a safetensors file (shorter than its header); re-save the checkpoint")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ArtifactError(f"{path} has a corrupt safetensors header (length {n}); re-save the checkpoint")
        spans = parse_safetensors_header(f.read(n), size - 8 - n, str(path))
    for name, span in spans.items():
        if span.dtype not in SAFETENSORS_TORCH:
            raise ArtifactError(f"{path}: tensor '{name}' has dtype {span.dtype}, which torch cannot hold here")
    return 8 + n, {name: {"dtype": span.dtype, "shape": list(span.shape), "data_offsets": [span.start, span.end]}
                   for name, span in spans.items()}


class CheckpointReader:
    """The tensors of a model directory's safetensors checkpoint (one file or an indexed set of shards)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / WEIGHTS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise OffsiteError(f"{index} is not a valid safetensors index (no weight_map); re-save the model")
        elif (self.dir / SINGLE_WEIGHTS).is_file():
            files = [SINGLE_WEIGHTS]
        else:
            raise OffsiteError(f"{self.dir} has no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}: safetensors weights are "
                               "required; convert your own pickle checkpoint once with python -c \"from transformers "
                               f"import AutoModelForCausalLM as M, AutoTokenizer as T; d='{self.dir}'; "
                               "M.from_pretrained(d).save_pretrained(d + '-st'); T.from_pretrained(d)"
                               ".save_pretrained(d + '-st')\" and pass that directory")
        self.entries: dict[str, tuple[str, int, dict]] = {}  # name -> (file, data start, header entry)
        for file in files:
            path = self.dir / file
            if "/" in file or not path.is_file():
                raise OffsiteError(f"{index}: shard '{file}' is missing; the checkpoint is incomplete")
            start, header = _read_header(path)
            for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if name in self.entries:
                    raise OffsiteError(f"{self.dir}: tensor '{name}' is stored twice; re-save the checkpoint")
                self.entries[name] = (file, start, meta)
        self.files = files

    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, by offset), so reads move forward through files."""
        return list(self.entries)

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_TORCH[self.entries[name][2]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name][2]["data_offsets"]
        return end - begin

    def read_flat(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, read from disk without touching the rest."""
        file, data, meta = self.entries[name]
        dtype = SAFETENSORS_TORCH[meta["dtype"]]
        numel = math.prod(meta["shape"])
        stop = numel if stop is None else min(stop, numel)
        start = min(max(start, 0), stop)
        out = torch.empty(stop - start, dtype=dtype)
        if out.numel():
            with open(self.dir / file, "rb") as f:
                f.seek(data + meta["data_offsets"][0] + start * dtype.itemsize)
                view = memoryview(out.view(torch.uint8).numpy()).cast("B")
                if f.readinto(view) != len(view):
                    raise ArtifactError(f"{self.dir / file} is truncated at tensor '{name}'; re-save the checkpoint")
        return out

    def get(self, name: str) -> torch.Tensor:
        """One whole tensor (its own memory; nothing else of the checkpoint stays resident)."""
        return self.read_flat(name).reshape(self.shape(name))

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.entries)

    def largest_shard_bytes(self) -> int:
        return max((self.dir / f).stat().st_size for f in self.files)


def _header_bytes(entries: list[tuple[str, list[int], torch.dtype]]) -> bytes:
    """The safetensors header of tensors laid out back to back in `entries` order."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": TORCH_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Write a checkpoint whose tensors are known in advance (name, shape, dtype), one tensor at a time.

    The plan is split into shards of at most `max_shard_bytes` (a larger single tensor gets its own
    shard); each shard's header is written first, then every tensor's bytes go straight to disk as it
    is `add`ed, in plan order, so the writer holds no tensor at all. `close()` checks that everything
    planned was written and writes the HF index (several shards) - the files are `model.safetensors` or
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`. Use inside an `atomic_dir`.
    """

    def __init__(self, out_dir: str | Path, plan: list[tuple[str, list[int], torch.dtype]],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if max_shard_bytes < 1:
            raise OffsiteError(f"max shard size {max_shard_bytes} must be positive")
        if not plan:
            raise OffsiteError("no tensors to write; the checkpoint would be empty")
        if len({name for name, _, _ in plan}) != len(plan):
            raise OffsiteError("a tensor name is planned twice; this is a bug in the caller")
        self.dir = Path(out_dir)
        shards: list[list[tuple[str, list[int], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            n = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, list(shape), dtype))
            size += n
        self.total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in plan)
        self.files = ([SINGLE_WEIGHTS] if len(shards) == 1
                      else [shard_name(i, len(shards)) for i in range(1, len(shards) + 1)])
        self.queue = [(file, shard) for file, shard in zip(self.files, shards)]
        self.weight_map = {name: file for file, shard in self.queue for name, _, _ in shard}
        self.expected: list[tuple[str, list[int], torch.dtype]] = []
        self.handle = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (its name, shape and dtype must be the plan's)."""
        if not self.expected:
            self._next_file()
        want = self.expected.pop(0)
        if (name, list(tensor.shape), tensor.dtype) != want:
            raise OffsiteError(f"tensor '{name}' {list(tensor.shape)} {tensor.dtype} is not the planned "
                               f"'{want[0]}' {want[1]} {want[2]}; this is a bug in the caller")
        if tensor.numel():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            self.handle.write(memoryview(flat.view(torch.uint8).numpy()).cast("B"))

    def _next_file(self) -> None:
        self._finish_file()
        if not self.queue:
            raise OffsiteError("more tensors than planned; this is a bug in the caller")
        file, shard = self.queue.pop(0)
        self.handle = open(self.dir / file, "wb")
        self.handle.write(_header_bytes(shard))
        self.expected = list(shard)

    def _finish_file(self) -> None:
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the file names written."""
        if self.expected or self.queue:
            missing = (self.expected or self.queue[0][1])[0][0]
            self._finish_file()
            raise OffsiteError(f"tensor '{missing}' was planned but never written; this is a bug in the caller")
        self._finish_file()
        if len(self.files) == 1:
            return list(self.files)
        from offsite_ds.atomic import write_json

        write_json(self.dir / WEIGHTS_INDEX, {"metadata": {"total_size": self.total}, "weight_map": self.weight_map})
        return self.files + [WEIGHTS_INDEX]


@dataclass
class _Converted:
    """Checkpoint tensors transformers converts into one or more model tensors on load (an MoE layer's experts,
    one tensor each, stacked into one): its converter, the name it files them under and the sources in order."""
    converter: object
    key: str
    sources: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint name, the pattern that matched)


def _checkpoint_renaming(skeleton, state: dict
                         ) -> tuple[Callable[[str], tuple[str | None, object | None, str | None]], Callable]:
    """(name -> (the model's name for a checkpoint tensor or None, the converter that builds it or None, the
    converter's pattern that matched); transformers' sort key for checkpoint names, the order a converter's
    sources are stacked in: expert 10 after expert 9).

    transformers renames some checkpoint tensors on load (GPT-NeoX's `embed_out` is `lm_head`; old LayerNorm
    `gamma`/`beta`) and converts others (one tensor per MoE expert stacked into one), per model class
    (`get_model_conversion_mapping`); both are followed here as `from_pretrained` follows them. A transformers
    without that mapping (or with another signature) renames nothing.
    """
    def nothing(_name: str) -> tuple[str | None, object | None, str | None]:
        return None, None, None

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                     rename_source_key)

        mapping = get_model_conversion_mapping(skeleton)
        rename_source_key("", [], [], skeleton.base_model_prefix, state)
    except (ImportError, TypeError):
        return nothing, str
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}

    def rename(name: str) -> tuple[str | None, object | None, str | None]:
        renamed, pattern = rename_source_key(name, renamings, converters, skeleton.base_model_prefix, state)
        if renamed not in state:
            return None, None, None
        return renamed, by_pattern.get(pattern), pattern

    return rename, dot_natural_key


class ModelCheckpoint:
    """A model directory's checkpoint seen under the model's own state-dict names, without loading weights.

    The model is built on the meta device (shapes only, no memory) to learn its state-dict names, tied
    aliases and family; checkpoint names are matched to them the way `from_pretrained` does (exactly, with
    the base-model prefix that older checkpoints omit, or through transformers' renames); tensors the model has no place for (old
    buffers such as GPT-2's `attn.bias`) are left out, as `from_pretrained` leaves them. A missing tensor
    or a wrong shape is refused with one line.
    """

    def __init__(self, model_dir: str | Path):
        from transformers import AutoModelForCausalLM

        from offsite_ds.families import supported_build
        from offsite_ds.runtime import load_model_config, require_model_dir

        self.dir = require_model_dir(model_dir)
        self.reader = CheckpointReader(self.dir)
        self.config = load_model_config(self.dir)
        with torch.device("meta"):
            self.skeleton, self.family = supported_build(lambda: AutoModelForCausalLM.from_config(self.config))
        state = self.skeleton.state_dict()
        self.shapes = {name: list(t.shape) for name, t in state.items()}
        self.parameters = {name for name, _ in self.skeleton.named_parameters(remove_duplicate=False)}
        prefix = self.skeleton.base_model_prefix
        rename, checkpoint_order = _checkpoint_renaming(self.skeleton, state)
        self.stored: dict[str, str] = {}  # model name -> checkpoint name, in storage order
        self.converted: dict[str, _Converted] = {}  # model name -> the conversion that builds it
        self.unused: list[str] = []  # checkpoint tensors the model has no place for (from_pretrained drops them)
        order: dict[str, int] = {}  # model name -> position of its (first) checkpoint tensor
        for position, name in enumerate(self.reader.names()):
            model_name = name if name in state else f"{prefix}.{name}" if f"{prefix}.{name}" in state else None
            converter = None
            if model_name is None:
                model_name, converter, pattern = rename(name)
            if model_name is None:
                self.unused.append(name)
                continue
            order.setdefault(model_name, position)
            if converter is not None:
                group = self.converted.setdefault(model_name, _Converted(converter, model_name))
                group.sources.append((name, pattern))
                continue
            if self.reader.shape(name) != self.shapes[model_name]:
                raise OffsiteError(f"{self.dir}: tensor '{name}' is {self.reader.shape(name)}, config.json implies "
                                   f"{self.shapes[model_name]}; the weights do not match config.json")
            self.stored[model_name] = name
        self._pending: dict[str, torch.Tensor] = {}  # a one-to-many conversion's targets not asked for yet
        self._flat: tuple[str, torch.Tensor] | None = None  # the converted tensor read_flat last sampled
        self._groups = list({id(g): g for g in self.converted.values()}.values())  # each conversion once
        for group in self._groups:
            group.sources.sort(key=lambda source: checkpoint_order(source[0]))
            first, *others = group.converter.target_patterns  # one-to-many (a fused QKV split): every target
            for target in (group.key.replace(first, other) for other in others):
                if target in state:
                    self.converted.setdefault(target, group)
                    order.setdefault(target, order[group.key])
        self._order = order
        self.alias: dict[str, str] = {}  # tied name -> the name it shares its tensor with (first in module order)
        groups: dict[int, list[str]] = {}
        for name, p in self.skeleton.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        for names in groups.values():
            for other in names[1:]:
                self.alias[other] = names[0]
        for name in state:
            if name in self.alias and name in self.stored and self.alias[name] in self.stored:
                del self.stored[name]  # a tied copy saved anyway: save_pretrained would not write it
            if not {name, self.alias.get(name)} & (self.stored.keys() | self.converted.keys()):
                raise OffsiteError(f"{self.dir}: the checkpoint lacks tensor '{name}'; the model directory is "
                                   "incomplete")

    def _convert(self, group: _Converted) -> dict[str, torch.Tensor]:
        """The model tensors `group` converts into, checked against the model's shapes; its sources are read one
        at a time and all held while converting (one MoE layer's experts)."""
        converter = copy.deepcopy(group.converter)
        try:
            for name, pattern in group.sources:
                converter.add_tensor(group.key, name, pattern, partial(self.reader.get, name))
            out = converter.convert(group.key, model=self.skeleton, config=self.config)
        except (TypeError, AttributeError, ValueError, RuntimeError) as exc:
            raise OffsiteError(f"{self.dir}: transformers could not convert '{group.sources[0][0]}' into "
                               f"'{group.key}' ({type(exc).__name__}: {str(exc)[:120]}); this transformers version "
                               "cannot be used to read this checkpoint tensor by tensor") from None
        out = {name: tensor[0] if isinstance(tensor, list) else tensor for name, tensor in out.items()}
        for name, tensor in out.items():
            if name not in self.shapes or list(tensor.shape) != self.shapes[name]:
                raise OffsiteError(f"{self.dir}: '{group.sources[0][0]}' converts into '{name}' "
                                   f"{list(tensor.shape)}, config.json implies {self.shapes.get(name)}; the weights do "
                                   "not match config.json")
        return out

    def held(self) -> list[str]:
        """The model names the checkpoint holds (tied copies it does not store left out), in storage order."""
        return sorted([*self.stored, *self.converted], key=self._order.__getitem__)

    def stored_dtype(self, model_name: str) -> torch.dtype:
        """The dtype the checkpoint stores `model_name` in (a converted tensor: its first source's)."""
        name = self._holder(model_name)
        if name in self.converted:
            return self.reader.dtype(self.converted[name].sources[0][0])
        return self.reader.dtype(self.stored[name])

    def read_flat(self, model_name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of `model_name`, flattened (a converted tensor is converted whole first)."""
        name = self._holder(model_name)
        if name in self.converted:
            if self._flat is None or self._flat[0] != name:  # sampled at both ends: converted once
                self._flat = (name, self.get(name).reshape(-1))
            return self._flat[1][start:stop]
        return self.reader.read_flat(self.stored[name], start, stop)

    def _holder(self, model_name: str) -> str:
        """`model_name`, or the name it is tied to where the checkpoint stores only that one."""
        return model_name if model_name in self.stored or model_name in self.converted else self.alias[model_name]

    @property
    def depth(self) -> int:
        from offsite_ds.families import get_path

        return len(get_path(self.skeleton, self.family.blocks))


    def state_names(self) -> list[str]:
        """Every name of the model's state dict (tied aliases included), as `model.state_dict()` lists them."""
        return list(self.shapes)

    def get(self, model_name: str) -> torch.Tensor:
        name = self._holder(model_name)
        if name not in self.converted:
            return self.reader.get(self.stored[name])
        if name not in self._pending:
            self._pending = self._convert(self.converted[name])
        return self._pending.pop(name)

    def dtype(self) -> torch.dtype:
        """The checkpoint's floating dtype (by bytes, the one most of the weights are stored in)."""
        by_dtype: dict[torch.dtype, int] = {}
        for name in [*self.stored.values(), *(n for g in self._groups for n, _ in g.sources)]:
            dt = self.reader.dtype(name)
            if dt.is_floating_point:
                by_dtype[dt] = by_dtype.get(dt, 0) + self.reader.nbytes(name)
        return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32

    def block_of(self, model_name: str) -> tuple[int, str] | None:
        """(block index, name inside the block) for a block tensor, else None."""
        head = self.family.blocks + "."
        if not model_name.startswith(head):
            return None
        index, _, rest = model_name[len(head):].partition(".")
        return int(index), rest
