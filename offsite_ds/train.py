"""The one training loop. Every role (data-owner tuning, owner distillation, full fine-tuning) runs here;
roles differ only in what is frozen, the loss and what they export.

Two engines behind one interface: DeepSpeed (ZeRO 0-3, offload) when a ds config is given, plain torch on
one device otherwise. Both use AdamW with linear warm-up then cosine decay, gradient clipping and
accumulation, checkpoint every `save_every` optimizer steps, resume exactly (data order, RNG, optimizer),
and save a checkpoint on SIGTERM before exiting (a pre-empted cluster job loses nothing).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from offsite_ds.atomic import write_json
from offsite_ds.ds_config import ADAM_BETAS, ADAM_EPS
from offsite_ds.errors import OffsiteError
from offsite_ds.runtime import Runtime

CHECKPOINT_POINTER = "latest.json"
EXIT_PREEMPTED = 143


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings (immutable: derive a variant with `dataclasses.replace`)."""

    steps: int | None = None  # optimizer steps; None -> derived from epochs
    epochs: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    batch_size: int = 8  # micro-batch per rank
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every: int = 0  # optimizer steps; 0 = evaluate only at the end
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0 = only on SIGTERM
    log_every: int = 10
    checkpoint_dir: str | None = None
    resume: bool = False
    keep_checkpoints: int = 2
    wandb: bool = False
    wandb_project: str = "offsite-ds"
    wandb_run_name: str | None = None
    deepspeed: str | dict | None = None  # ds config path/dict -> DeepSpeed engine
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    progress: bool = True
    device: str | None = None
    torch_adam: bool = False  # DeepSpeed engine: torch's AdamW instead of the fused/CPU Adam (no JIT op build)

    def total_steps(self, micro_batches_per_epoch: int) -> int:
        if self.steps is not None:
            if self.steps < 1:
                raise OffsiteError(f"--steps {self.steps} must be >= 1")
            return self.steps
        if self.epochs <= 0:
            raise OffsiteError(f"--epochs {self.epochs} must be > 0")
        return max(1, math.ceil(self.epochs * micro_batches_per_epoch / self.grad_accum))


def checkpoint_dir_beside(out_dir: str | Path) -> str:
    """Default checkpoint folder: OUT.checkpoints next to the artifact, so the artifact holds only itself."""
    return str(Path(out_dir).with_name(Path(out_dir).name + ".checkpoints"))


def for_output(cfg: TrainConfig, out_dir: str | Path) -> TrainConfig:
    """`cfg` for a run writing `out_dir`: its checkpoint dir defaults to OUT.checkpoints (a copy; cfg is frozen)."""
    return replace(cfg, checkpoint_dir=cfg.checkpoint_dir or checkpoint_dir_beside(out_dir))


def cosine_with_warmup(total: int, warmup: int, min_ratio: float = 0.0):
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

    def __init__(self, model, params, cfg: TrainConfig, total_steps: int, runtime: Runtime):
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

    def autocast(self):
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
        tmp = directory / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, directory / "state.pt")
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

    def __init__(self, model, params, cfg: TrainConfig, total_steps: int, runtime: Runtime):
        import copy

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

    def autocast(self):
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


UNIVERSAL_DIR = "universal"


def saved_world_size(directory: Path) -> int | None:
    """Number of data-parallel ranks a DeepSpeed ZeRO checkpoint was saved on (None: no ZeRO files)."""
    import re

    ranks = {int(m.group(1)) for p in directory.glob("*optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$", p.name))}
    return len(ranks) or None


def to_universal(directory: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint directory (atomic: `out` appears complete or not at all)."""
    import argparse
    import shutil

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


def save_checkpoint(engine, root: Path, step: int, client_state: dict, rank: int, keep: int) -> None:
    """Write a checkpoint dir, then move the `latest` pointer (so a crash mid-save keeps the old one)."""
    import shutil

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


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading_main():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
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

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------- the loop

def train(role, loader, cfg: TrainConfig, runtime: Runtime | None = None) -> dict:
    """Train `role` on `loader` (object with len() micro-batches per epoch and iterate(start_step)).

    Returns a summary: steps, tokens, final and best losses, the role's final metrics, wall time.
    Exports via `role.export` whenever the evaluation improves (or once at the end when the role has no
    evaluation). `runtime` defaults to the one `cfg` asks for (and is then closed at the end).
    """
    if runtime is not None:
        return _train(role, loader, cfg, runtime)
    with Runtime.from_config(cfg) as own:
        return _train(role, loader, cfg, own)


class _StepWindow:
    """Means of the loss and the role's metrics over one optimizer step's micro-batches."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, loss: torch.Tensor, metrics: dict) -> None:
        for key, value in {"loss": loss.detach(), **metrics}.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.n += 1

    def close(self) -> dict[str, float]:
        means = {k: v / self.n for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return means


def _resume_state(engine, cfg: TrainConfig, ckpt_root: Path | None, runtime: Runtime) -> dict:
    state = {"step": 0, "micro": 0, "tokens": 0, "best_eval": None, "best_step": None, "last_loss": None,
             "last_metrics": {}, "history": []}
    if cfg.resume:
        found = latest_checkpoint(ckpt_root) if ckpt_root else None
        if found is None:
            raise OffsiteError(f"--resume: no checkpoint under {ckpt_root}; run without --resume to start afresh")
        state.update(engine.load_checkpoint(found))
        if runtime.is_main:
            print(f"resumed from {found} at step {state['step']}", file=sys.stderr)
    return state


def _progress_bar(cfg: TrainConfig, role, total: int, start_step: int, runtime: Runtime):
    if not (cfg.progress and runtime.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start_step, desc=getattr(role, "name", "train"), dynamic_ncols=True)


def _micro_step(role, engine, batch: dict, state: dict, window: _StepWindow, world: int) -> bool:
    """Forward and backward one micro-batch; True when the optimizer stepped."""
    batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with engine.autocast():
        loss, metrics = role.compute_loss(engine, batch)
    if not torch.isfinite(loss):
        raise OffsiteError(f"loss became {loss.item()} at step {state['step']}; lower --lr or check the data")
    stepped = engine.backward_and_step(loss)
    state["tokens"] += int(batch["attention_mask"].sum()) * world if "attention_mask" in batch else 0
    window.add(loss, metrics)
    return stepped


def _record_step(state: dict, means: dict, engine, cfg: TrainConfig, bar, run) -> None:
    """Count the optimizer step; progress bar, loss history and W&B get its mean loss and metrics."""
    state["step"] += 1
    state["last_loss"] = means.pop("loss")
    state["last_metrics"] = means
    log = {"loss": state["last_loss"], "lr": engine.lr(), "grad_norm": engine.last_grad_norm,
           "tokens": state["tokens"], **means}
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{log['loss']:.4f}", lr=f"{log['lr']:.2e}")
    if cfg.log_every and state["step"] % cfg.log_every == 0:
        state["history"].append({"step": state["step"], "loss": round(log["loss"], 6)})
    if run is not None:
        run.log(log, step=state["step"])


def _train(role, loader, cfg: TrainConfig, runtime: Runtime) -> dict:
    total = cfg.total_steps(len(loader))
    torch.manual_seed(cfg.seed)
    params = list(role.trainable_parameters())
    if not params:
        raise OffsiteError("nothing to train: the role left no parameter trainable")
    engine = (DeepSpeedEngine if runtime.deepspeed else TorchEngine)(role.model, params, cfg, total, runtime)
    ckpt_root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    state = _resume_state(engine, cfg, ckpt_root, runtime)
    run = _wandb_init(cfg, role, total) if (cfg.wandb and runtime.is_main) else None
    bar = _progress_bar(cfg, role, total, state["step"], runtime)
    start, window, summary_extra = time.time(), _StepWindow(), {}
    role.model.train()
    with _Preemption() as preempt:
        batches = loader.iterate(state["micro"])
        while state["step"] < total:
            micro, batch = next(batches)
            stepped = _micro_step(role, engine, batch, state, window, runtime.world)
            state["micro"] = micro + 1
            if not stepped:
                continue
            _record_step(state, window.close(), engine, cfg, bar, run)
            last, stop = state["step"] == total, preempt.agreed()
            if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or last:
                summary_extra.update(_evaluate_and_keep_best(role, engine, state, run, start, total))
                role.model.train()
            if ckpt_root is not None and ((cfg.save_every and state["step"] % cfg.save_every == 0 and not last)
                                          or stop):
                save_checkpoint(engine, ckpt_root, state["step"], state, runtime.rank, cfg.keep_checkpoints)
            if stop:
                if bar is not None:
                    bar.close()
                print(f"SIGTERM: checkpoint saved at step {state['step']}; rerun with --resume", file=sys.stderr)
                sys.exit(EXIT_PREEMPTED)
    if bar is not None:
        bar.close()
    if run is not None:
        run.finish()
    role.model.eval()
    return _summary(state, start, total, summary_extra)


def _summary(state: dict, start: float, total: int, extra: dict) -> dict:
    metrics = state.get("last_metrics") or {}  # the role's own per-step metrics, when it reports any
    return {"steps": state["step"], "total_steps": total, "tokens": state["tokens"],
            "final_loss": state["last_loss"], "best_eval_loss": state["best_eval"], "best_step": state["best_step"],
            "wall_seconds": round(time.time() - start, 2), "loss_history": state["history"],
            **({"final_metrics": metrics} if metrics else {}), **extra}


def _evaluate_and_keep_best(role, engine, state, run, start, total) -> dict:
    """Evaluate on every rank (ZeRO-3 gathers are collective); export when the eval loss improved."""
    metrics = role.evaluate(engine.module) or {}
    if run is not None and metrics:
        run.log({f"eval/{k}": v for k, v in metrics.items()}, step=state["step"])
    score = metrics.get("eval_loss")
    improved = score is None or state["best_eval"] is None or score < state["best_eval"]
    if score is not None and improved:
        state["best_eval"], state["best_step"] = score, state["step"]
    if improved:
        role.export(engine.module, _summary(state, start, total, {"eval": metrics}))
    return {"last_eval": metrics}


def _wandb_init(cfg: TrainConfig, role, total: int):
    try:
        import wandb
    except ImportError:
        raise OffsiteError("--wandb needs the wandb package: pip install wandb")
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, dir=cfg.checkpoint_dir or ".",
                      config={**asdict(cfg), "role": getattr(role, "name", "train"), "total_steps": total})
