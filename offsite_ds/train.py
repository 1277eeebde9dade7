"""The one training loop. Every role (data-owner tuning, owner distillation, full fine-tuning) runs here;
roles differ only in what is frozen, the loss and what they export.

The loop drives one of two engines (`offsite_ds.engines`: DeepSpeed ZeRO 0-3 with offload, or plain
torch on one device), both with AdamW, linear warm-up then cosine decay, gradient clipping and
accumulation. It checkpoints every `save_every` optimizer steps, resumes exactly (data order, RNG,
optimizer), and saves a checkpoint on SIGTERM before exiting (a pre-empted cluster job loses nothing).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from offsite_ds.engines import (EXIT_PREEMPTED, DeepSpeedEngine, Engine, Preemption, TorchEngine,
                                checkpoint_dir_beside, latest_checkpoint, save_checkpoint)
from offsite_ds.errors import OffsiteError
from offsite_ds.runtime import Runtime


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings (immutable: derive a variant with `dataclasses.replace`)."""

    steps: int | None = None  # optimizer steps; None -> derived from epochs
    epochs: float = 1.0
    lr: float | None = 1e-4  # None: `tune` takes the owner's advised lr from the bundle (offsite_ds.lr_probe)
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

    def __post_init__(self) -> None:  # a non-positive lr would train silently in the wrong direction, or not at all
        if self.lr is not None and not self.lr > 0:
            raise OffsiteError(f"--lr {self.lr:g} must be positive")

    def total_steps(self, micro_batches_per_epoch: int) -> int:
        if self.steps is not None:
            if self.steps < 1:
                raise OffsiteError(f"--steps {self.steps} must be >= 1")
            return self.steps
        if self.epochs <= 0:
            raise OffsiteError(f"--epochs {self.epochs} must be > 0")
        return max(1, math.ceil(self.epochs * micro_batches_per_epoch / self.grad_accum))


def for_output(cfg: TrainConfig, out_dir: str | Path) -> TrainConfig:
    """`cfg` for a run writing `out_dir`: its checkpoint dir defaults to OUT.checkpoints (a copy; cfg is frozen)."""
    return replace(cfg, checkpoint_dir=cfg.checkpoint_dir or checkpoint_dir_beside(out_dir))


# ----------------------------------------------------------------------------------------- the loop

def train(role, loader, cfg: TrainConfig, runtime: Runtime | None = None) -> dict:
    """Train `role` on `loader` (object with len() micro-batches per epoch and iterate(start_step)).

    Returns a summary: steps, tokens, final and best losses, the role's final metrics, wall time.
    Exports via `role.export` whenever the evaluation improves (or once at the end when the role has no
    evaluation). `runtime` defaults to the one `cfg` asks for (and is then closed at the end).
    """
    if cfg.lr is None:
        raise OffsiteError("no learning rate: pass --lr")
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


def _resume_state(engine: Engine, cfg: TrainConfig, ckpt_root: Path | None, runtime: Runtime) -> dict:
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


def _micro_step(role, engine: Engine, batch: dict, state: dict, window: _StepWindow, world: int) -> bool:
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


def _record_step(state: dict, means: dict, engine: Engine, cfg: TrainConfig, bar, run) -> None:
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
    engine: Engine = (DeepSpeedEngine if runtime.deepspeed else TorchEngine)(role.model, params, cfg, total, runtime)
    ckpt_root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    state = _resume_state(engine, cfg, ckpt_root, runtime)
    run = _wandb_init(cfg, role, total) if (cfg.wandb and runtime.is_main) else None
    bar = _progress_bar(cfg, role, total, state["step"], runtime)
    start, window, summary_extra = time.time(), _StepWindow(), {}
    role.model.train()
    with Preemption() as preempt:
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
