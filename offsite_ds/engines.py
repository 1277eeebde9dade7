"""The training loop's engines and their checkpoints: what `offsite_ds.train.train` steps, saves and resumes.

Two engines behind one interface (`__call__`, `autocast`, `backward_and_step`, `lr`, `save_checkpoint`,
`load_checkpoint`): DeepSpeed (ZeRO 0-3, offload) when the Runtime has a ds config, plain torch on one
device otherwise. Kept apart from the loop because checkpoint storage (the `latest` pointer, pruning,
DeepSpeed's universal conversion for a new world size) and SIGTERM handling change with the cluster and
DeepSpeed's version, not with what a role trains. `cfg` below is the run's `train.TrainConfig`
(not imported: the loop sits above this module).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from offsite_ds.atomic import write_json, write_with
from offsite_ds.ds_config import ADAM_BETAS, ADAM_EPS
from offsite_ds.errors import OffsiteError
from offsite_ds.runtime import Runtime

CHECKPOINT_POINTER = "latest.json"
EXIT_PREEMPTED = 143
UNIVERSAL_DIR = "universal"


class Engine(Protocol):
    """What the loop drives: the two engines below."""

    module: torch.nn.Module
    device: torch.device
    last_grad_norm: float

    def __call__(self, *args, **kwargs): ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def backward_and_step(self, loss: torch.Tensor) -> bool: ...
    def lr(self) -> float: ...
    def save_checkpoint(self, directory: Path, client_state: dict) -> None: ...
    def load_checkpoint(self, directory: Path) -> dict: ...


def checkpoint_dir_beside(out_dir: str | Path) -> str:
    """Default checkpoint folder: OUT.checkpoints next to the artifact, so the artifact holds only itself."""
    return str(Path(out_dir).with_name(Path(out_dir).name + ".checkpoints"))


def cosine_with_warmup(total: int, warmup: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to `min_ratio` at `total`."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ------------------------------------------------------------------------------------------ engines

class TorchEngine:
    """One device, plain torch: AdamW + cosine, accumulation, clipping, bf16 autocast on CUDA."""

    def __init__(self, model: torch.nn.Module, params: Iterable[torch.nn.Parameter], cfg, total_steps: int,
                 runtime: Runtime):
        device = runtime.device
        self.module, self.cfg, self.device = model.to(device), cfg, device
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=tuple(ADAM_BETAS), eps=ADAM_EPS, fused=device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
        self.bf16 = runtime.autocast_bf16
        self.micro = 0
        self.last_grad_norm = float("nan")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        """Accumulate; step the optimizer at the accumulation boundary. Returns True when it stepped."""
        (loss / self.cfg.grad_accum).backward()
        self.micro += 1
        if self.micro % self.cfg.grad_accum:
            return False
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, directory: Path, client_state: dict) -> None:
        """Trainable weights + optimizer + scheduler + RNG; local resume state, never shipped to anyone."""
        trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
        state = {"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "micro": self.micro,
                 "cpu_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        write_with(directory / "state.pt", partial(torch.save, state))
        write_json(directory / "client_state.json", client_state)

    def load_checkpoint(self, directory: Path) -> dict:
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                if name not in params:
                    raise OffsiteError(f"checkpoint {directory} does not match this model ('{name}'); "
                                       "resume with the same bundle, mode and settings")
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return json.loads((directory / "client_state.json").read_text())


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO 0-3, offload) behind the same interface; it owns accumulation."""

    def __init__(self, model: torch.nn.Module, params: Iterable[torch.nn.Parameter], cfg, total_steps: int,
                 runtime: Runtime):
        import deepspeed

        self.cfg, self.device = cfg, runtime.device
        self.rank, self.world = runtime.rank, runtime.world
        # the Runtime's config, filled once (already, when the model was built sharded); a copy: the engine adds keys
        ds_config = copy.deepcopy(runtime.configure(cfg, model_config=getattr(model, "config", None)))
        schedule = cosine_with_warmup(total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        optimizer = None
        if "optimizer" not in ds_config:
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            ds_config.setdefault("zero_allow_untested_optimizer", True)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=list(params), optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.module = self.engine.module
        self.bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
        self.last_grad_norm = float("nan")

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine casts the model itself

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = float(norm) if norm is not None else float("nan")
        return boundary

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_checkpoint(self, directory: Path, client_state: dict) -> None:
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, client_state=client_state)

    def load_checkpoint(self, directory: Path) -> dict:
        """Resume; a checkpoint saved on another number of ranks goes through DeepSpeed's universal format.

        A cluster job rarely gets the same allocation back: ZeRO partitions are per rank, so a checkpoint
        of N ranks is converted once (ds_to_universal, on rank 0, into `<checkpoint>/universal`) and loaded
        on M ranks with `checkpoint.load_universal`, each rank taking its new partition.
        """
        saved = saved_world_size(directory)
        load_dir, tag = directory.parent, directory.name
        if saved is not None and saved != self.world:
            universal = directory / UNIVERSAL_DIR
            if self.rank == 0 and not (universal / "zero").is_dir():
                to_universal(directory, universal)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
            load_dir, tag = directory, UNIVERSAL_DIR
            self.engine._config.load_universal_checkpoint = True  # the runtime form of checkpoint.load_universal
        try:
            _, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag)
        finally:
            self.engine._config.load_universal_checkpoint = False  # later saves stay ordinary checkpoints
        if client_state is None:
            raise OffsiteError(f"DeepSpeed could not load checkpoint {directory}; remove --resume to start afresh")
        return client_state


def saved_world_size(directory: Path) -> int | None:
    """Number of data-parallel ranks a DeepSpeed ZeRO checkpoint was saved on (None: no ZeRO files)."""
    ranks = {int(m.group(1)) for p in directory.glob("*optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$", p.name))}
    return len(ranks) or None


def to_universal(directory: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint directory (atomic: `out` appears complete or not at all)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(directory), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(sys.stderr):
        ds_to_universal(args)
    os.replace(tmp, out)


# --------------------------------------------------------------------------------------- checkpoints

def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / CHECKPOINT_POINTER
    if not pointer.is_file():
        return None
    tag = json.loads(pointer.read_text()).get("tag")
    path = root / str(tag)
    return path if path.is_dir() else None


def save_checkpoint(engine: Engine, root: Path, step: int, client_state: dict, rank: int, keep: int) -> None:
    """Write a checkpoint dir, then move the `latest` pointer (so a crash mid-save keeps the old one)."""
    directory = root / f"step{step:08d}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    engine.save_checkpoint(directory, client_state)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        write_json(root / CHECKPOINT_POINTER, {"tag": directory.name, "step": step})
        old = sorted(p for p in root.glob("step*") if p.is_dir() and p != directory)
        for stale in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if threading_main():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled: all ranks must save (a collective) together.

        A launcher that forwards SIGTERM rank by rank (the `deepspeed` launcher waits for rank 0 to
        exit before signalling rank 1) would otherwise leave one rank saving while another steps on.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0],
                            device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def threading_main() -> bool:
    """Signal handlers can only be installed from the main thread (a notebook or test may train in another)."""
    return threading.current_thread() is threading.main_thread()

