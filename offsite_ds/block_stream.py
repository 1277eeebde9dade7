"""Run a causal LM one block at a time: the owner's calibration without holding the model.

The calibrated builders (drop-one importance, iterative elimination, CRaSh's CKA, block fitting) and the
emulate guard compare many variants of one model: the full model, the model without block i, the emulator.
Each variant is a `Path`, the original block indices it executes in order (non-decreasing: a block is
skipped, run, or repeated in place), optionally with replacement modules for some blocks (a fitted or
compressed copy). `sweep` runs many paths at once and visits every block once: paths that agree so far
share one hidden state, and a path forks off where it first differs, so drop-one scoring of m blocks costs
about 1 + m/2 forward passes, not m + 1.

A `BlockSource` hands out the blocks: `LoadedBlocks` from a model in memory, `StreamedBlocks` from the
checkpoint's shards, one block at a time, so the owner's memory is the embeddings and head, one block and the
cached hidden states, never the model (the property the streamed uniform drop already had). Both give the
same numbers: each block is called with the arguments the model's own forward gives it (masks, rotary
position embeddings, ALiBi, per-layer attention types), recorded once per batch by stand-ins, and the final
states are scored by the model's own forward (final norm, projection, logit transform) through a stand-in
that returns them, with evaluate.token_nll's windows and batches.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FilePath

import torch
import torch.nn as nn

from offsite_ds.errors import OffsiteError
from offsite_ds.evaluate import token_nll, window_batches, window_ids
from offsite_ds.families import backbone_and_head, block_prefix, family_of, get_path, set_path
from offsite_ds.surgery import block_input, block_output, running_blocks, with_block_input

Call = tuple[tuple, dict]  # the (args, kwargs) a block is called with; its hidden states are swapped per run


class BlockSource:
    """A causal LM whose blocks are handed out one at a time.

    `model` runs everything but the blocks (embeddings, final norm, head); `block(i)` is block i ready to run
    (in `model`'s device and dtype), `release(i)` says it is no longer needed.
    """

    model: nn.Module
    depth: int

    def block(self, index: int) -> nn.Module:
        raise NotImplementedError

    def release(self, index: int) -> None:
        """Free block `index` (streamed sources drop it; a loaded model keeps it)."""

    def own_copy(self, index: int) -> nn.Module:
        """Block `index` as a module of the caller's own, to train or compress (the model stays untouched)."""
        return copy.deepcopy(self.block(index))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stand_in(self, index: int) -> nn.Module:
        """The module the model's forward sees in block `index`'s place (attributes such as the layer's
        attention type are read from it)."""
        return get_path(self.model, family_of(self.model).blocks)[index]


class LoadedBlocks(BlockSource):
    """The blocks of a model already in memory (tests, a model on a GPU, the benchmarks)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.depth = len(get_path(model, family_of(model).blocks))

    def block(self, index: int) -> nn.Module:
        return get_path(self.model, family_of(self.model).blocks)[index]


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation) while
    buffers stay real: non-persistent buffers such as rotary frequencies are computed by `__init__` and are
    not in the checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = get_path(root, module_path) if module_path else root
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    else:
        module._buffers[leaf] = value


class StreamedBlocks(BlockSource):
    """A model read from its checkpoint's shards: everything but the blocks is loaded once, a block is read
    (tensor by tensor) each time it is asked for and dropped when released.

    Memory: embeddings, final norm and head in `dtype`, plus one block; the checkpoint's tensors are read one
    at a time (offsite_ds.shards), so no shard is held whole.
    """

    def __init__(self, model_dir: str | FilePath, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None):
        from transformers import AutoModelForCausalLM

        from offsite_ds.shards import ModelCheckpoint

        self.checkpoint = ModelCheckpoint(model_dir)
        self.dtype = dtype
        self.target = torch.device(device or "cpu")
        self.family = self.checkpoint.family  # known (and refused if unsupported) when the checkpoint was opened
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(self.checkpoint.config, dtype=dtype)
        self._meta_blocks = get_path(model, self.family.blocks)
        self.depth = len(self._meta_blocks)
        set_path(model, self.family.blocks, nn.ModuleList())  # detached while the rest is loaded and moved
        head = self.family.blocks + "."
        for name in self.checkpoint.state_names():
            if not name.startswith(head) and name not in self.checkpoint.alias:
                _set_tensor(model, name, self._read(name))
        for name, first in self.checkpoint.alias.items():  # tied weights share the loaded tensor
            if not name.startswith(head):
                _set_tensor(model, name, model.get_parameter(first))
        model.to(self.target)
        set_path(model, self.family.blocks, self._meta_blocks)
        self.model = model.eval()

    def _read(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.get(name)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    @property
    def device(self) -> torch.device:
        return self.target

    def block(self, index: int) -> nn.Module:
        block = copy.deepcopy(self._meta_blocks[index])  # meta parameters copy for free; buffers are real
        prefix = block_prefix(self.family, index)
        for name in block.state_dict():
            _set_tensor(block, name, self._read(prefix + name))
        return block.to(self.target).eval()

    def own_copy(self, index: int) -> nn.Module:
        return self.block(index)  # read afresh from the checkpoint: already the caller's own


class Upcast(nn.Module):
    """A block kept in a narrower dtype (the bundle's, e.g. bf16) run in `dtype`: a working copy per call.

    So K fitted blocks cost what the bundle will hold while they wait to be written, and the guard measures
    the weights that are shipped, rounding included."""

    def __init__(self, block: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.block, self.compute_dtype = block, dtype

    def forward(self, *args, **kwargs):
        same = all(p.dtype == self.compute_dtype for p in self.block.parameters())
        block = self.block if same else copy.deepcopy(self.block).to(self.compute_dtype)
        return block(*args, **kwargs)


def as_source(model: nn.Module | BlockSource) -> BlockSource:
    return model if isinstance(model, BlockSource) else LoadedBlocks(model)


class _StandIn(nn.Module):
    """Sits in a block's place in the model's forward; reads missing attributes (attention type, layer index)
    from the block it stands for. `act(args, kwargs)` decides what it returns."""

    def __init__(self, stands_for: nn.Module, act: Callable[[tuple, dict], object]):
        super().__init__()
        object.__setattr__(self, "_stands_for", stands_for)  # not a submodule: its parameters stay out
        object.__setattr__(self, "_act", act)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._stands_for, name)

    def forward(self, *args, **kwargs):
        return self._act(args, kwargs)


class _Stop(Exception):
    pass


@dataclass
class Stream:
    """Token windows in evaluate.token_nll's batches, and what every block is called with on each batch."""

    ids: torch.Tensor
    seq_len: int
    batch_size: int
    chunks: list[list[tuple[int, int, int]]]  # per batch: (begin, end, scored) windows
    inputs: list[torch.Tensor]  # per batch: the first block's hidden-state input
    calls: list[list[Call]]  # [batch][block]
    as_tuple: bool  # whether a block returns a tuple (BLOOM, GPT-2) or its hidden states alone

    def run(self, block: nn.Module, hidden: torch.Tensor, batch: int, index: int) -> torch.Tensor:
        """`block` on `hidden` with the other arguments block `index` gets on batch `batch`."""
        args, kwargs = with_block_input(*self.calls[batch][index], hidden)
        return block_output(block(*args, **kwargs))

    def wrap(self, hidden: torch.Tensor):
        return (hidden,) if self.as_tuple else hidden


@torch.no_grad()
def open_stream(source: BlockSource, ids: torch.Tensor, seq_len: int, batch_size: int = 4) -> Stream:
    """Record, per batch of `ids`' windows, the first block's input and every block's call arguments."""
    model = source.model
    chunks = window_batches(ids.numel(), seq_len, seq_len, batch_size)
    batches = [window_ids(ids, chunk).to(source.device) for chunk in chunks]
    depth = source.depth
    caught: list[Call] = []

    def catch(args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    was_training = model.training
    model.eval()
    try:
        with running_blocks(model, [0], {0: _StandIn(source.stand_in(0), catch)}):
            with contextlib.suppress(_Stop):
                model(input_ids=batches[0], use_cache=False)
        first = source.block(0)
        as_tuple = isinstance(first(*caught[0][0], **caught[0][1]), tuple)
        source.release(0)
        calls: list[list[Call]] = []
        inputs: list[torch.Tensor] = []
        for batch in batches:
            row: list[Call] = []

            def record(args, kwargs, row=row):
                row.append((args, kwargs))
                hidden = block_input(args, kwargs)
                return (hidden,) if as_tuple else hidden

            stand_ins = {i: _StandIn(source.stand_in(i), record) for i in range(depth)}
            with running_blocks(model, list(range(depth)), stand_ins):
                model.base_model(input_ids=batch, use_cache=False)
            if len(row) != depth:
                raise OffsiteError(f"{type(model).__name__}'s forward called {len(row)} of its {depth} blocks; "
                                   "block streaming needs every block called once, in order")
            inputs.append(block_input(*row[0]))
            calls.append(row)
    finally:
        model.train(was_training)
    return Stream(ids, seq_len, batch_size, chunks, inputs, calls, as_tuple)


@dataclass(frozen=True)
class Path:
    """One variant of the model: the original blocks it runs, in order, and modules run in some blocks'
    place (a fitted or compressed copy)."""

    blocks: tuple[int, ...]
    replace: Mapping[int, nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(b > a for a, b in zip(self.blocks[1:], self.blocks)):
            raise OffsiteError(f"path {list(self.blocks)} runs a block after a later one; a streamed path "
                               "must be non-decreasing (blocks skipped, run or repeated in place)")


Visit = Callable[[int, list[int], list[torch.Tensor]], None]


@torch.no_grad()
def sweep(source: BlockSource, stream: Stream, paths: Sequence[Path], visit: Visit | None = None,
          desc: str | None = None) -> list[list[torch.Tensor]]:
    """Run every path over the stream's batches; per path, the per-batch output of its last block.

    Each block is fetched once (and released after); paths that have run the same modules so far share
    their hidden states. `visit(b, paths, states)` sees each group's states entering block b (b = depth:
    the final states), `paths` being the indices of the paths in that group.
    """
    was_training = source.model.training
    source.model.eval()  # a loaded model's blocks run without dropout
    try:
        groups = _sweep(source, stream, paths, visit, desc)
    finally:
        source.model.train(was_training)
    out: list[list[torch.Tensor]] = [[] for _ in paths]
    for members, states in groups:
        for p in members:
            out[p] = states
    return out


def _sweep(source: BlockSource, stream: Stream, paths: Sequence[Path], visit: Visit | None,
           desc: str | None) -> list[tuple[list[int], list[torch.Tensor]]]:
    from tqdm.auto import tqdm

    cursor = [0] * len(paths)
    groups: list[tuple[list[int], list[torch.Tensor]]] = [(list(range(len(paths))), list(stream.inputs))]
    for b in tqdm(range(source.depth), desc=desc, disable=desc is None, leave=False):
        if visit is not None:
            for members, states in groups:
                visit(b, members, states)
        plan: dict[tuple[int, int, int], list[int]] = {}  # (group, runs of b, replacement id) -> paths
        for g, (members, _) in enumerate(groups):
            for p in members:
                runs = 0
                while cursor[p] < len(paths[p].blocks) and paths[p].blocks[cursor[p]] == b:
                    runs, cursor[p] = runs + 1, cursor[p] + 1
                module = paths[p].replace.get(b) if runs else None
                plan.setdefault((g, runs, id(module) if module is not None else 0), []).append(p)
        original = None
        next_groups = []
        for (g, runs, module_id), members in plan.items():
            states = groups[g][1]
            if runs:
                module = paths[members[0]].replace.get(b)
                if module is None:
                    original = original or source.block(b)
                    module = original
                for _ in range(runs):
                    states = [stream.run(module, x, k, b) for k, x in enumerate(states)]
            next_groups.append((members, states))
        if original is not None:
            source.release(b)
        groups = next_groups
    if visit is not None:
        for members, states in groups:
            visit(source.depth, members, states)
    return groups


@contextlib.contextmanager
def _last_block_returns(source: BlockSource, stream: Stream, state: Callable[[], torch.Tensor]) -> Iterator[None]:
    """The model's forward with a stand-in last block that returns `state()` (the rest of the forward - final
    norm, output projection - is the model's own)."""
    last = source.depth - 1
    stand_in = _StandIn(source.stand_in(last), lambda args, kwargs: stream.wrap(state()))
    with running_blocks(source.model, [last], {last: stand_in}):
        yield


@torch.no_grad()
def mean_nll_of(source: BlockSource, stream: Stream, finals: list[torch.Tensor]) -> float:
    """Mean NLL of the stream's tokens given the last block's output per batch: the model's own final norm,
    head and logit transform, through a stand-in block that returns the given states."""
    feed = iter(finals)
    with _last_block_returns(source, stream, lambda: next(feed)):
        nll, count = token_nll(source.model, stream.ids, stream.seq_len, stream.seq_len, stream.batch_size)
    return nll / count


def final_states(source: BlockSource, stream: Stream, batch: int, hidden: torch.Tensor) -> torch.Tensor:
    """The model's final norm (and any output projection) on batch `batch`'s last-block output `hidden`,
    differentiably (what the head reads)."""
    ids = window_ids(stream.ids, stream.chunks[batch]).to(hidden.device)
    with _last_block_returns(source, stream, lambda: hidden):
        return backbone_and_head(source.model)[0](input_ids=ids, use_cache=False)[0]


def path_nlls(source: BlockSource, stream: Stream, paths: Sequence[Path], desc: str | None = None) -> list[float]:
    """Mean calibration NLL of each path, in one sweep."""
    return [mean_nll_of(source, stream, finals) for finals in sweep(source, stream, paths, desc=desc)]


def full_path(source: BlockSource) -> Path:
    return Path(tuple(range(source.depth)))
