"""ZeRO-3 model building and gathering: a 7B model is built sharded and is never whole on one rank.

With transformers 5 the only working way to build a partitioned model is an `HfDeepSpeedConfig`
that stays alive while `from_pretrained`/`from_config` run (they then open `deepspeed.zero.Init`
themselves, with weight init disabled); a bare `deepspeed.zero.Init` around the constructor crashes in
`_init_weights`. The Runtime (offsite_ds/runtime.py) owns that object and the loader. Outside `forward` a partitioned parameter is an empty tensor (`numel()==0`, the real
shape in `ds_shape`), so any read of weights - comparison, fingerprint, export - gathers them with
`deepspeed.zero.GatheredParameters` (a collective: every rank calls it, in the same order), and only
rank 0 keeps a CPU copy for export.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from offsite_ds.runtime import rank_and_world


def enable_activation_checkpointing(model) -> None:
    """Recompute block activations in backward (non-reentrant: works with frozen inputs and ZeRO-3)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------------------- gathering

def is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The real shape of a parameter, partitioned or not."""
    return getattr(tensor, "ds_shape", tensor.shape)


def full_numel(tensor: torch.Tensor) -> int:
    return int(getattr(tensor, "ds_numel", tensor.numel()))


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make partitioned parameters whole inside the block (collective); a no-op for plain ones.

    With `modifier_rank` set, that rank's in-place changes are re-partitioned to all ranks on exit.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def _persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    skip = getattr(module, "_non_persistent_buffers_set", set())
    for name, buf in module.named_buffers(recurse=False):
        if buf is not None and name not in skip:
            yield name, buf


def gathered_state_dict(model: torch.nn.Module, to_rank: int | None = 0) -> dict[str, torch.Tensor] | None:
    """The model's state dict as CPU tensors, gathered one module at a time.

    Every rank must call it (the gathers are collective); with `to_rank=0` only rank 0 keeps copies
    and gets the dict (others get None), so memory for the whole model is needed on one rank's host
    only, and only at export. `to_rank=None` returns it on every rank.
    """
    keep = to_rank is None or rank_and_world()[0] == to_rank
    out: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = list(module.named_parameters(recurse=False))
        with gathered([p for _, p in own]):
            for name, param in own:
                if keep:
                    if id(param) not in copies:
                        copies[id(param)] = param.detach().to("cpu", copy=True)
                    out[f"{prefix}.{name}" if prefix else name] = copies[id(param)]
        if keep:
            for name, buf in _persistent_buffers(module):
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().to("cpu", copy=True)
    return out if keep else None


@torch.no_grad()
def tensors_equal(pairs: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]) -> str | None:
    """Name of the first pair whose (gathered) values differ, or None; the same answer on every rank."""
    for name, a, b in pairs:
        with gathered([a, b]):
            if full_shape(a) != full_shape(b) or not torch.equal(a.detach().cpu(), b.detach().cpu()):
                return name
    return None
