"""ZeRO-3 model building and gathering: a 7B model is built sharded and is never whole on one rank.

With transformers 5 the only working way to build a partitioned model is an `HfDeepSpeedConfig`
that stays alive while `from_pretrained`/`from_config` run (they then open `deepspeed.zero.Init`
themselves, with weight init disabled); a bare `deepspeed.zero.Init` around the constructor crashes in
`_init_weights`. Outside `forward` a partitioned parameter is an empty tensor (`numel()==0`, the real
shape in `ds_shape`), so any read of weights - comparison, fingerprint, export - gathers them with
`deepspeed.zero.GatheredParameters` (a collective: every rank calls it, in the same order), and only
rank 0 keeps a CPU copy for export.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from offsite_ds.ds_config import is_zero3
from offsite_ds.errors import OffsiteError


def init_distributed() -> None:
    """Join the process group the launcher set up (no-op for one plain process without a launcher)."""
    import warnings

    # torch 2.13 deprecates the collective names DeepSpeed calls on every step; one warning per call is noise
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # one process, no launcher: give it a one-rank group so DeepSpeed's collectives still work
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(verbose=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def activate_zero3(ds_config: dict | None):
    """Return the HfDeepSpeedConfig that makes transformers build models sharded, or None (not ZeRO-3).

    The caller MUST keep the returned object referenced for as long as models are built or saved:
    transformers holds it only through a weak reference.
    """
    if not is_zero3(ds_config):
        return None
    init_distributed()
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def zero3_active() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def model_dtype(ds_config: dict | None) -> torch.dtype:
    """The dtype weights are built in: bf16 when the engine trains in bf16, fp32 otherwise."""
    if ds_config and ds_config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    return torch.float32


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local HF causal LM (safetensors only); sharded when an HfDeepSpeedConfig for ZeRO-3 is alive."""
    from transformers import AutoModelForCausalLM

    from offsite_ds.families import family_of

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise OffsiteError(f"{path} is not a Hugging Face model directory (no config.json); pass a local model dir")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True,
                                                     trust_remote_code=False)
    except OSError as exc:
        raise OffsiteError(f"cannot load {path}: {str(exc).splitlines()[0]} (safetensors weights are required)")
    family_of(model)
    return model


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
    keep = to_rank is None or rank() == to_rank
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
