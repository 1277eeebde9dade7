"""Fit the emulator's kept middle blocks to stand in for the runs they replace, on the owner's public text.

Layer-drop leaves gaps: kept block k_i is followed by a run of dropped blocks whose work is lost. Each kept
block is trained to map the emulator's own hidden state at its input to the full model's hidden state at the
end of its run (the input of the next kept block), one block at a time from the bottom: block i is fitted on
the stream that the already-fitted blocks below it produce, so the errors it corrects are the ones the
emulator really makes (not the teacher's, which it never sees at run time).

Cost: one forward pass of the full model over the fitting tokens, up to the last run's end (teacher states
cached at the K+1 run boundaries; streamed from the checkpoint block by block when the source is), then, per
kept block, epochs of forward+backward through that one block on the cache - no
embedding, head or other block is run, so a step costs about 1/depth of an end-to-end distillation step.

Loss: each token's squared error relative to the teacher's squared norm there (positions 0, the attention
sinks with hidden states orders of magnitude larger, left out), so every token counts alike; optionally a
cosine term. Calibration text only: the data owner's corpus never enters.

Then (kl_epochs) the blocks are trained end to end on KL(full || emulator) of the next-token distributions, a
change kept only if it lowered that KL on public text the fit never read (`emulate`: the guard's calibration tokens);
with `align` the adapter blocks train with them, so the bundle ships adapter blocks under which the emulator
behaves more like the model. The data owner tunes from those, and the plug-in adds only its change to the
model's own blocks (offsite_ds.plugin.install_adapter): the alignment is the emulator's, not the task's.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import pathlib
import shutil
import sys
import time
from dataclasses import dataclass, replace
from typing import NamedTuple
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from offsite_ds.atomic import write_json, write_with
from offsite_ds.block_stream import BlockSource, Path, Stream, Upcast, as_source, final_states, open_stream, sweep
from offsite_ds.data import start_token_id, window_len
from offsite_ds.engines import EXIT_PREEMPTED, Preemption
from offsite_ds.errors import OffsiteError
from offsite_ds.evaluate import head_kl
from offsite_ds.families import (backbone_and_head, block_linears, is_transposed_linear, kv_floats_per_token,
                                 logit_transform)
from offsite_ds.manifests import FIT_TEXTS
from offsite_ds.runtime import default_device_type, load_model, resolved_precision


# {low rank: the KL phase's lr}, chosen on PTB valid at the default budget (16 KL steps; emulator / full model):
# all weights 11.61x at 1e-4, 10.58x at 3e-4, 11.37x at 1e-3, 19.92x at 3e-3; rank 8 12.44x at 1e-3, 11.04x at 3e-3,
# 11.99x at 1e-2 (rank 32 at 3e-3: 10.66x). A low-rank update wants a 10x larger lr, as LoRA does.
KL_LR = {False: 3e-4, True: 3e-3}
# --fit-text self: the fit reads text the full model samples itself (temperature 1, from the tokenizer's BOS), so
# the emulator learns the model's own distribution, not the public text's domain. SmolLM2-135M importance 2-8-2,
# 16,384 tokens, 16 KL steps: PTB valid 10.58x (public Wikipedia) -> 8.73x (self); public held-out 11.44x -> 12.04x.
# A static key/value cache (preallocated, not grown a token at a time): 32 x 512 tokens of SmolLM2-135M in 96 s
# against 132 s on the 2-core CPU (bf16 autocast). Sequences sampled at once: 5.2 ms a token at 32, 4.0 at 128
# (64 positions, fp32); fewer where their cache would pass SAMPLE_KV_BYTES (a 7B model with full attention and
# bf16 weights: 16 at 512 tokens)
SAMPLE_BATCH = 128
SAMPLE_KV_BYTES = 4 << 30
# the model's next-token distribution as it is: set explicitly, so a checkpoint's generation_config.json (a chat
# model's temperature 0.6, top-p 0.9, repetition penalty) cannot reshape what the emulator learns to match
PLAIN_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
                  "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


@dataclass(frozen=True)
class FitSettings:
    """How the kept blocks are fitted: tokens read from the public text, epochs, optimiser, sequence length."""
    tokens: int = 16384
    epochs: int = 4
    lr: float = 3e-4
    # one window a step: at the same tokens and owner CPU, 4x the steps of 4 windows fit closer (SmolLM2-135M 2-8-2,
    # the default fit: KL 2.089 -> 1.430, public held-out 11.97x -> 7.47x, PTB valid 11.04x -> 10.47x; README)
    batch_size: int = 1
    seq_len: int = 512
    weight_decay: float = 0.0
    seed: int = 0
    kl_epochs: int = 2  # then end to end: KL(full || emulator) of the next-token distributions (0: off)
    kl_lr: float | None = None  # None: KL_LR, for all weights or for a low-rank update
    kl_tokens: int = 0  # public tokens the KL phase reads (0: the block fit's `tokens`); the block fit's come first
    # the KL phase trains a rank-r update of each matrix, and the norms and biases (0: all weights). 8 by default:
    # within the owner-memory target (3.29 GB against 12.98 GB for all weights on a 2.20 GB checkpoint) for 84-94%
    # of the all-weights gain (SmolLM2-135M 2-8-2; README, `--fit-kl-rank`)
    kl_rank: int = 8
    align: bool = False  # the KL phase also trains the adapter blocks; the plug-in takes that shift out again
    kl_interface: float = 0.0  # weight of the top adapter's input's relative error in the KL phase's loss (0: off)
    kl_perturb: float = 0.0  # the KL phase also matches the model with noise on the bottom adapter's matrices (0: off)
    precision: str = "auto"  # training steps under bf16 autocast ("bf16") or not; auto: bf16 on a GPU where native
    text: str = "public"  # what the fit reads: the owner's public text, or "self": text sampled from the model itself

    def __post_init__(self) -> None:
        if self.kl_lr is None:
            object.__setattr__(self, "kl_lr", KL_LR[self.kl_rank > 0])
        # resolved here, so the manifest records what ran. auto: bf16 where it is native, except on a CPU, chosen
        # when the default fit peaked at 3.70 GB under bf16 autocast against 3.42 GB in fp32 (target 3.41 GB, a 2.20
        # GB checkpoint); re-measured at b9caaac both peak at 3.43 GB, and bf16 was 1.27x faster with the same
        # emulator: a candidate to change back, with the demo's figures re-measured
        device = default_device_type()
        asked = "fp32" if self.precision == "auto" and device == "cpu" else self.precision
        object.__setattr__(self, "precision", resolved_precision(asked, device, "--fit-precision"))
        for name in ("tokens", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise OffsiteError(f"--fit-{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if not self.lr > 0 or self.weight_decay < 0 or self.seq_len < 2:
            raise OffsiteError(f"--fit-lr {self.lr:g} must be positive (weight decay >= 0, seq_len >= 2)")
        if self.kl_epochs < 0 or not self.kl_lr > 0 or self.kl_tokens < 0 or self.kl_rank < 0:
            raise OffsiteError(f"--fit-kl-epochs {self.kl_epochs}, --fit-kl-tokens {self.kl_tokens} and --fit-kl-rank "
                               f"{self.kl_rank} must be >= 0 and --fit-kl-lr {self.kl_lr:g} positive")
        if self.text not in FIT_TEXTS:
            raise OffsiteError(f"--fit-text {self.text} must be one of {', '.join(FIT_TEXTS)}")
        if not self.kl_interface >= 0:
            raise OffsiteError(f"--fit-kl-interface {self.kl_interface:g} must be >= 0 (0: the KL phase alone)")
        if self.kl_interface and not self.kl_epochs:
            raise OffsiteError("--fit-kl-interface weighs a term of the KL phase's loss: give --fit-kl-epochs >= 1")
        if not self.kl_perturb >= 0:
            raise OffsiteError(f"--fit-kl-perturb {self.kl_perturb:g} must be >= 0 (0: the unperturbed model alone)")
        if self.kl_perturb and not self.kl_epochs:
            raise OffsiteError("--fit-kl-perturb adds inputs to the KL phase: give --fit-kl-epochs >= 1")
        if self.kl_perturb and self.align:
            raise OffsiteError("--fit-kl-perturb perturbs the bottom adapter that --fit-align trains: give one of them")
        if self.align and not self.kl_epochs:
            raise OffsiteError("--fit-align trains the adapter blocks in the KL phase: give --fit-kl-epochs >= 1")

    @property
    def fit_tokens(self) -> int:
        """Tokens the fit reads in all: the block fit's, or the KL phase's when it reads more."""
        return max(self.tokens, self.kl_tokens if self.kl_epochs else 0)

    @property
    def public_tokens(self) -> int:
        """Tokens of the owner's public text the fit reads (none when it reads the model's own text)."""
        return self.fit_tokens if self.text == "public" else 0


# Named owner budgets (`--fit-budget`): FitSettings fields over the defaults, so an owner picks a point of the cost
# curve in one flag rather than six. Measured at the demo's layout (SmolLM2-135M 2-12-2 at 0.54 of the MLP, PTB,
# a 2-core CPU with native bf16; owner seconds, public / PTB valid ratio to the full model, README "Owner budgets"):
# default 373 s, 3.14x / 6.31x; mid 816 s, 2.80x / 4.88x; half-hour 1,740 s, 2.18x / 4.05x; hour 3,181 s, 2.03x /
# 4.15x (all weights: peak RSS with the round trip 4.22 GB at half-hour, 3.87 at hour, against mid's 2.60 and the
# demo's 2.79). Both read one window a step, as the default does; half-hour is the hour with 2 KL epochs, not 5. Plug-in
# over seeds 42-44: half-hour 35.85 / 40.01, hour 35.32 / 39.27 - better on every seed than the hour of four windows a
# step (480 steps, 3,044 s, 2.23x / 4.29x, 4.95 GB: 35.67 / 39.67), which it replaced on 2026-12-07.
# `bf16_where_native`: the steps run under bf16 autocast where the device multiplies bf16 natively, CPUs included
# (1.27x faster; FitSettings' own "auto" keeps a CPU in fp32 for the owner's memory).
_HOUR = {"batch_size": 1, "kl_rank": 0, "kl_lr": 3e-4, "kl_tokens": 196608, "kl_epochs": 5, "bf16_where_native": True}
FIT_BUDGETS: dict[str, dict] = {
    "default": {},
    "mid": {"kl_tokens": 65536},
    "half-hour": _HOUR | {"kl_epochs": 2},
    "hour": _HOUR,
}


def budget_settings(budget: str = "default", **given) -> FitSettings:
    """FitSettings of a named owner budget (FIT_BUDGETS), with the fields in `given` over it (None: the budget's)."""
    if budget not in FIT_BUDGETS:
        raise OffsiteError(f"--fit-budget {budget} must be one of {', '.join(FIT_BUDGETS)}")
    fields = dict(FIT_BUDGETS[budget])
    if fields.pop("bf16_where_native", False):
        fields["precision"] = resolved_precision("auto", default_device_type())
    given = {name: value for name, value in given.items() if value is not None}
    if "kl_rank" in given and "kl_lr" not in given:
        fields.pop("kl_lr", None)  # the KL lr then follows the rank given (KL_LR)
    return FitSettings(**(fields | given))


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (position 0 of each window excluded) of |pred - target|^2 / |target|^2."""
    pred, target = pred[:, 1:].float(), target[:, 1:].float()
    return ((pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)).mean()


@torch.no_grad()
def teacher_states(source: BlockSource, stream: Stream, boundaries: list[int], start: int = 0
                   ) -> list[dict[int, torch.Tensor]]:
    """The full model's hidden state at the INPUT of each block in `boundaries` (an index equal to the depth:
    the last block's output), per batch of the stream; blocks after the last boundary are never run. With
    `start`, the stream's inputs enter block `start` (the blocks before it are not run, nor fetched)."""
    wanted = set(boundaries)
    states: list[dict[int, torch.Tensor]] = [{} for _ in stream.inputs]

    def keep(b: int, _paths: list[int], hidden: list[torch.Tensor]) -> None:
        if b in wanted:
            for k, h in enumerate(hidden):
                states[k][b] = h

    sweep(source, stream, [Path(tuple(range(start, max(boundaries))))], visit=keep)
    return states


def noisy_copy(block: nn.Module, scale: float, generator: torch.Generator) -> nn.Module:
    """A copy of `block` whose every matrix W has Gaussian noise of standard deviation `scale` x rms(W) added (the
    norms and biases stay): each matrix's output moves by about `scale` of itself, in a random direction."""
    noisy = copy.deepcopy(block)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() >= 2:
                rms = p.float().pow(2).mean().sqrt()
                p.add_((torch.randn(p.shape, generator=generator) * (scale * rms)).to(p.device, p.dtype))
    return noisy


@torch.no_grad()
def perturbed_states(source: BlockSource, stream: Stream, bottom: int, boundaries: list[int], scale: float,
                     seed: int) -> list[dict[int, torch.Tensor]]:
    """Per batch, the full model's hidden state at the input of each block in `boundaries` (all >= `bottom`; the
    depth: the last block's output) when its bottom adapter, blocks 0..bottom-1, carries noise (noisy_copy), one
    draw per batch: what the middle answers to a changed bottom adapter, as the data owner's tuning changes it.
    Each block is fetched once (a streamed source never holds the model): the noisy bottom blocks here, the rest
    by teacher_states from their output."""
    if not 0 < bottom <= min(boundaries):
        raise OffsiteError(f"perturbing the bottom adapter needs one (bottom {bottom}) below every state asked for")
    g = torch.Generator().manual_seed(seed)
    hidden = list(stream.inputs)
    for b in range(bottom):
        block = source.block(b)
        hidden = [stream.run(noisy_copy(block, scale, g).eval(), x, k, b) for k, x in enumerate(hidden)]
        source.release(b)
    return teacher_states(source, replace(stream, inputs=hidden), boundaries, start=bottom)


@torch.no_grad()
def self_text(model: nn.Module, start_id: int, tokens: int, seq_len: int, seed: int = 0, bf16: bool = False,
              batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """`tokens` (rounded up to whole sequences) of text the model samples from its own next-token distribution:
    sequences of `seq_len` tokens, each from `start_id`, plain sampling at temperature 1 (no top-k, no top-p:
    the distribution the KL phase matches), seeded. One id stream, a sequence per fitting window.

    The model is held whole while it samples (the streamed owner's bound does not hold for this step), with the
    key/value cache of `batch_size` sequences (None: SAMPLE_BATCH, fewer where the cache would pass SAMPLE_KV_BYTES;
    the cache is held in the weights' dtype, under bf16 autocast too).
    """
    from tqdm.auto import tqdm

    n_seq = -(-tokens // seq_len)
    if batch_size is None:  # the static cache takes the weights' dtype, autocast or not
        per_seq = seq_len * kv_floats_per_token(model.config) * next(model.parameters()).element_size()
        batch_size = max(1, min(SAMPLE_BATCH, SAMPLE_KV_BYTES // per_seq))
    device = next(model.parameters()).device
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(seed)
        for start in tqdm(range(0, n_seq, batch_size), desc="sample the model's own text", disable=not progress):
            b = min(batch_size, n_seq - start)
            prompt = torch.full((b, 1), start_id, device=device)
            rows.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=seq_len - 1,
                                       min_new_tokens=seq_len - 1, pad_token_id=start_id, cache_implementation="static",
                                       disable_compile=True, **PLAIN_SAMPLING).cpu())  # no compile on a GPU either
    return torch.cat(rows).reshape(-1)


def sample_own_text(model_dir, tokenizer, settings: FitSettings, progress: bool = False
                    ) -> tuple[torch.Tensor, dict]:
    """`--fit-text self`: the fit's tokens sampled from the full model (loaded whole, on the GPU when there is one,
    freed on return), one sequence per fitting window; and the record for the manifest."""
    start = start_token_id(tokenizer)
    if start is None:
        raise OffsiteError("--fit-text self starts each sample from the tokenizer's BOS or EOS token, and this "
                           "tokenizer has neither: use --fit-text public")
    model = load_model(model_dir)
    if torch.cuda.is_available():
        model.cuda()
    began = time.perf_counter()
    ids = self_text(model, start, settings.fit_tokens, window_len(settings.seq_len, model.config), settings.seed,
                    settings.precision == "bf16", progress=progress)
    return ids, {"tokens": int(ids.numel()), "start_id": int(start),
                 "seconds": round(time.perf_counter() - began, 1)}


class FitCheckpoints:
    """`emulate`'s long steps kept in a folder (default OUT.checkpoints, beside the bundle) so that a run stopped
    by a crash, Ctrl-C, SIGTERM or the guard goes on where it stopped when the same command runs again, instead of
    starting over: the sampled text, the chosen blocks, each fitted block, and the training steps every `every_s`
    seconds. Why: the fit of an owner-scale model runs for hours. Local state of the owner's, never shipped: torch
    files read back with `weights_only`. `open(key)` names the run (the model's fingerprint, the corpus', every
    setting that changes the result): the same run continues (it gives the very result an uninterrupted one
    would), a folder holding another run's progress is refused, never mixed in or overwritten; `remove()` after
    the bundle is written. Nothing touches the disk before the first step is kept."""

    def __init__(self, root: str | pathlib.Path, every_s: float = 600.0):
        if not every_s >= 0:
            raise OffsiteError(f"--save-every-s {every_s}: give the seconds between checkpoints, 0 or more")
        self.root, self.every_s = pathlib.Path(root), every_s
        self.opened = False
        self._last = time.monotonic()

    def open(self, key: dict, log=None) -> None:
        key_file = self.root / "key.json"
        if key_file.is_file():
            if json.loads(key_file.read_text()) != json.loads(json.dumps(key)):
                raise OffsiteError(f"{self.root} holds the progress of another emulate run (another model, public "
                                   "text or setting): rerun that command to finish it, or remove the folder (or "
                                   "give --checkpoint-dir) to start this one")
            if log is not None:
                log(f"continuing the stopped run kept in {self.root}")
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise OffsiteError(f"checkpoint folder {self.root} is not empty and holds no emulate progress: name a new "
                               "or empty folder (--checkpoint-dir)")
        self.key, self.opened, self._last = key, True, time.monotonic()

    def load(self, name: str) -> dict | None:
        path = self.root / f"{name}.pt"
        if not (self.opened and path.is_file()):
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # written atomically, so only a foreign or damaged file gets here
            raise OffsiteError(f"{path} is unreadable ({type(exc).__name__}); remove {self.root} to start "
                               "afresh") from None

    def save(self, name: str, state: dict) -> None:
        if not self.opened:
            return
        if not (self.root / "key.json").is_file():  # written with the first step kept: a run that failed before
            self.root.mkdir(parents=True, exist_ok=True)  # keeping anything leaves no folder behind
            write_json(self.root / "key.json", self.key)
        write_with(self.root / f"{name}.pt", partial(torch.save, state))
        self._last = time.monotonic()

    def held(self) -> bool:
        """Whether any step is kept."""
        return self.opened and (self.root / "key.json").is_file()

    def drop(self, name: str) -> None:
        if self.opened:
            (self.root / f"{name}.pt").unlink(missing_ok=True)

    def due(self) -> bool:
        return self.opened and time.monotonic() - self._last >= self.every_s

    def remove(self) -> None:
        if self.opened:
            shutil.rmtree(self.root, ignore_errors=True)


class Keep(NamedTuple):
    """Where _train keeps its steps: `name` in `checkpoints`; `what` names the phase in the SIGTERM line; `at_end`:
    the last step too (the KL phase: a crash after it then skips it; a fitted block is kept by its caller)."""
    checkpoints: FitCheckpoints
    name: str
    what: str
    at_end: bool


def _train(params: list[nn.Parameter], loss_of, batches: int, epochs: int, lr: float, weight_decay: float,
           generator: torch.Generator, desc: str | None, bf16: bool = False,
           keep: Keep | None = None) -> None:
    """`epochs` shuffled passes over `batches` minimising `loss_of(batch)`: AdamW, cosine decay to 0; with `bf16`,
    each forward under bf16 autocast (the weights, gradients and optimiser state stay fp32).

    `keep`: the weights, AdamW's moments, the step, its epoch and the generator's state at that epoch's start are
    saved when `checkpoints.due()`, at the end if `at_end`, and on SIGTERM (then exit 143, as `train` does), and
    restored from there first: a resumed run takes the very steps the uninterrupted one would."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * batches
    done, first_epoch = 0, 0
    saved = keep.checkpoints.load(keep.name) if keep is not None else None
    if saved is not None:  # the state at a step boundary: weights, moments, and where the shuffling stood
        done = int(saved["step"])
        with torch.no_grad():
            for p, value in zip(params, saved["params"]):
                p.copy_(value)
        for i, moments in saved["moments"].items():
            opt.state[params[i]] = {"step": torch.tensor(float(done)),  # read to the CPU: back where p is
                                    **{k: v.to(params[i].device) for k, v in moments.items()}}
        generator.set_state(saved["generator"])  # as the saved step's epoch began: its order is drawn again
        first_epoch = int(saved["epoch"])
    bar = tqdm(total=steps, initial=done, desc=desc, disable=desc is None)
    step = first_epoch * batches

    def save(epoch: int, epoch_start: torch.Tensor) -> None:
        keep.checkpoints.save(keep.name, {"step": step, "epoch": epoch, "generator": epoch_start,
                                          "params": [p.detach() for p in params],  # written as they are
                                          "moments": {i: {k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")}
                                                      for i, p in enumerate(params) if p in opt.state}})

    with Preemption() as preemption:
        for epoch in range(first_epoch, epochs):
            epoch_start = generator.get_state()
            for b in torch.randperm(batches, generator=generator).tolist():
                if step < done:
                    step += 1
                    continue
                with torch.autocast(params[0].device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_of(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for group in opt.param_groups:  # cosine decay to 0: the lr of step `step`, as LambdaLR computes it
                    group["lr"] = lr * (0.5 * (1 + math.cos(math.pi * step / steps)))
                opt.step()
                step += 1
                bar.update(1)
                if keep is not None and ((step == steps and keep.at_end) or preemption.requested
                                         or keep.checkpoints.due()):
                    save(epoch, epoch_start)
                    if preemption.requested:  # as the training loop does (train.py): one line, exit 143
                        bar.close()
                        print(f"SIGTERM: progress saved at step {step} of {steps} ({keep.what}) in "
                              f"{keep.checkpoints.root}; run the same command again to continue", file=sys.stderr)
                        sys.exit(EXIT_PREEMPTED)
    bar.close()
    opt.zero_grad(set_to_none=True)  # the trained modules are kept: not their last gradients or Adam's moments
    opt.state.clear()


def fit_kept_blocks(model: nn.Module | BlockSource, ids: torch.Tensor, block_map: list[int], bottom: int, kept: int,
                    settings: FitSettings = FitSettings(), progress: bool = False,
                    log=None, store_dtype: torch.dtype | None = None, checkpoints: FitCheckpoints | None = None,
                    held_out: torch.Tensor | None = None) -> tuple[dict[int, nn.Module], list[dict], dict | None]:
    """Fitted copies of the kept middle blocks (with `settings.align`, of the adapter blocks too: the KL phase then
    runs from the embeddings and trains them as well), {original block index: trained block}; per block the
    relative error to its run's end on the fitting tokens before and after ({block, end, before, after});
    and with `settings.kl_epochs` the end-to-end phase's mean KL before and after ({before, after}, else None).

    `block_map` is the emulator's (original index per position; bottom adapter blocks first). The model is
    left unchanged. `ids` is the owner's public token stream: the block fit reads its first `settings.tokens`,
    the KL phase its first `settings.kl_tokens` (or the same). The
    fitted blocks are returned (and, without the KL phase, kept from the moment each is done) in `store_dtype`
    (default: the source's), the dtype the bundle writes: K fitted blocks cost their size in the bundle.
    `checkpoints` (opened): each fitted block and the training steps are kept there, and a resumed run reads them
    back (the teacher pass runs again: it is one forward pass).
    `held_out`: public tokens the fit never reads (`emulate` passes the guard's calibration tokens). The KL phase's
    before and after are measured there, and decide whether its change is kept; without them, on its own tokens.
    """
    source = as_source(model)
    depth = source.depth
    middle = block_map[bottom:bottom + kept]
    after = block_map[bottom + kept] if bottom + kept < len(block_map) else depth
    ends = middle[1:] + [after]  # the teacher's state each fitted block must produce: its run's end
    seq_len = window_len(settings.seq_len, source.model.config)
    n = min(ids.numel(), settings.tokens) // seq_len
    if n < 1:
        raise OffsiteError(f"fitting needs at least {seq_len} tokens of public text; got {ids.numel()}")
    kl_n = min(ids.numel(), settings.kl_tokens or settings.tokens) // seq_len if settings.kl_epochs else 0
    data = open_stream(source, ids[: n * seq_len], seq_len, settings.batch_size)
    shared = kl_n == n  # the KL phase reads the block fit's tokens: one teacher pass gives both their states
    if block_map[:bottom] != list(range(bottom)):
        raise OffsiteError(f"block map {block_map} does not start with the bottom adapter, blocks 0..{bottom - 1}")
    # the position the KL phase's emulator starts at, and the teacher state it reads (the adapter's blocks are the
    # model's first): the embeddings' output, or the bottom adapter's
    first = 0 if settings.align else bottom
    at = KLAt(first, bottom, after if settings.kl_interface else None, depth)  # the KL phase's teacher states
    states = teacher_states(source, data, sorted({bottom, *ends} | (set(at.wanted()) if shared else set())))
    batches = range(len(states))
    # the emulator's input to its first kept middle block: the bottom adapter's output, whatever it drops after it
    stream = [s[bottom] for s in states]
    store_dtype = store_dtype or next(source.model.parameters()).dtype
    fitted: dict[int, nn.Module] = {}
    report: list[dict] = []
    g = torch.Generator().manual_seed(settings.seed)
    for block_index, end in zip(middle, ends):
        block = source.own_copy(block_index).float().train()
        source.release(block_index)
        done = checkpoints.load(f"block-{block_index}") if checkpoints is not None else None
        if done is not None:  # fitted before the run stopped: its weights, and the generator as it left it
            block.load_state_dict(done["state"])
            g.set_state(done["generator"])
            before = done["before"]
        else:
            for p in block.parameters():
                p.requires_grad_(True)
            with torch.no_grad():
                before = sum(float(relative_error(data.run(block, x, k, block_index), states[k][end]))
                             for k, x in enumerate(stream)) / len(batches)
            _train(list(block.parameters()), lambda b: relative_error(data.run(block, stream[b], b, block_index),
                                                                      states[b][end]),
                   len(batches), settings.epochs, settings.lr, settings.weight_decay, g,
                   f"fit block {block_index} -> {end}" if progress else None, settings.precision == "bf16",
                   None if checkpoints is None else Keep(checkpoints, f"block-{block_index}-steps",
                                                         f"fit block {block_index} -> {end}", at_end=False))
        block.eval().requires_grad_(False)
        if checkpoints is not None and done is None:
            checkpoints.save(f"block-{block_index}", {"state": block.state_dict(), "generator": g.get_state(),
                                                      "before": before})
            checkpoints.drop(f"block-{block_index}-steps")
        with torch.no_grad():
            stream = [data.run(block, x, k, block_index) for k, x in enumerate(stream)]
            after_fit = sum(float(relative_error(x, s[end])) for x, s in zip(stream, states)) / len(batches)
        if log is not None:
            log(f"fit block {block_index} (run to {end}): relative error {before:.4g} -> {after_fit:.4g}"
                + (" (fitted before the run was resumed)" if done is not None else ""))
        report.append({"block": block_index, "end": end, "before": before, "after": after_fit})
        # the KL phase trains all K blocks again: in fp32, or (low rank) their matrices as they wait
        fitted[block_index] = block if settings.kl_epochs and not settings.kl_rank else block.to(store_dtype)
    kl = None
    if settings.kl_epochs:
        kl_states = states if shared else None
        del states, stream  # the fit's states are dropped before the KL phase's own teacher pass
        if not shared:
            data = open_stream(source, ids[: kl_n * seq_len], seq_len, settings.batch_size)
        train = kl_views(source, data, at, settings, settings.seed + 2, kl_states)
        del kl_states  # only the states per batch the KL phase reads stay
        if train.shift is not None and log is not None:
            log(f"fit end to end: the bottom adapter's output, perturbed, moves by {train.shift:.4g} (relative error)")
        measure = None
        if held_out is not None and held_out.numel() >= 2:  # windows of the fit's length, or one of all there is;
            held = held_out[: kl_n * seq_len]  # never more than the KL phase trains on: its states are held too
            window = min(seq_len, held.numel())
            measure = kl_views(source, open_stream(source, held[: held.numel() // window * window], window,
                                                   settings.batch_size), at, settings, settings.seed + 3)
        if settings.align:  # the adapter blocks train too, from the model's own (fp32, or waiting narrow)
            for i in block_map[:bottom] + block_map[bottom + kept:]:
                fitted[i] = source.own_copy(i).to(torch.float32 if not settings.kl_rank else store_dtype)
                source.release(i)
        kl = kl_finish(source, train, block_map[first:], fitted, settings, progress, log,
                       None if at.interface is None else bottom + kept - first, checkpoints, measure)
        if train.shift is not None:
            kl["perturb_shift"] = train.shift
    return {i: block.to(store_dtype) for i, block in fitted.items()}, report, kl


class _NarrowLinear(torch.autograd.Function):
    """x W^T for a frozen W stored narrow (the bundle's bf16): upcast for the product in forward and again in
    backward, so only the narrow W is kept for the backward pass (a CPU without bf16 units computes in fp32).
    Under autocast to W's own dtype the product takes W as it is: autocast would cast the upcast copy straight
    back, so the same product without two copies of the matrix."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        device = x.device.type
        as_is = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == weight.dtype
        return x @ (weight if as_is else weight.to(x.dtype)).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None


def _narrow_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer (nn.Linear, or Conv1D storing [in, out]) whose frozen weight waits narrow."""
    weight = module.weight.t() if is_transposed_linear(module) else module.weight  # a view: [out, in]
    y = _NarrowLinear.apply(x, weight)
    return y if module.bias is None else y + module.bias


class LowRankUpdate(nn.Module):
    """A rank-r update (x A^T) B^T added to one frozen linear layer's output (nn.Linear or GPT-2's Conv1D). The
    layer's weight is read as it waits, in the bundle's dtype: never copied, never given a gradient. B starts
    at zero, so the block starts as fitted."""

    def __init__(self, n_in: int, n_out: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, n_in, generator=generator) / math.sqrt(n_in))
        self.b = nn.Parameter(torch.zeros(n_out, rank))

    def add_to(self, _module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + (inputs[0] @ self.a.t()) @ self.b.t()

    @torch.no_grad()
    def merge_into(self, module: nn.Module) -> None:
        delta = self.b @ self.a  # [out, in]
        weight = module.weight
        weight.copy_((weight.float() + (delta.t() if is_transposed_linear(module) else delta)).to(weight.dtype))


@torch.no_grad()
def _plain_linear(module: nn.Module, n_in: int, n_out: int) -> bool:
    """Whether `module` maps x to one [.., n_out] tensor, checked on a probe: a layer that subclasses nn.Linear
    with a forward of its own (Phi-MoE's router returns a tuple) gets no low-rank update and keeps its forward."""
    weight = module.weight
    out = module(torch.zeros(1, n_in, dtype=weight.dtype, device=weight.device))
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, n_out)


def low_rank_params(blocks: list[nn.Module], rank: int, generator: torch.Generator
                    ) -> tuple[list[nn.Parameter], list[tuple[nn.Module, LowRankUpdate, object]]]:
    """Hook a LowRankUpdate on every linear layer of `blocks` (their matrices frozen) and return what the KL
    phase trains - the updates and the 1-D parameters (norms, biases, made fp32) - and the updates to merge
    (merge_low_rank). A matrix that waits narrower than fp32 stays so (_NarrowLinear), and kl_finish recomputes
    each block's activations in the backward pass instead of keeping them: the owner then holds the blocks as
    the bundle will, plus r x (in + out) per layer and one block's activations."""
    trainable, updates = [], []
    for block in blocks:
        for p in block.parameters():
            if p.dim() >= 2:
                p.requires_grad_(False)
            else:
                p.data = p.data.float()
                trainable.append(p)
        for name, (n_in, n_out) in block_linears(block).items():
            module = block.get_submodule(name)
            if not _plain_linear(module, n_in, n_out):  # an MoE router that subclasses nn.Linear (Phi-MoE's)
                continue
            if module.weight.dtype != torch.float32:
                module.forward = partial(_narrow_forward, module)  # the instance's; merge_low_rank removes it
            update = LowRankUpdate(n_in, n_out, min(rank, n_in, n_out), generator)
            updates.append((module, update, module.register_forward_hook(update.add_to)))
            trainable += [update.a, update.b]
    return trainable, updates


def merge_low_rank(updates: list[tuple[nn.Module, LowRankUpdate, object]], keep: bool = True) -> None:
    """Fold each update into its layer's weight (or drop it: `keep` False) and remove its hook: plain blocks again."""
    for module, update, handle in updates:
        handle.remove()
        module.__dict__.pop("forward", None)
        if keep:
            update.merge_into(module)


def _exact_in(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """An fp32 weight that `dtype` holds exactly (a checkpoint stored in it, streamed as fp32): cast there and back,
    it is the same bit for bit. Checked a slice of rows at a time, so the check holds no second copy of it."""
    return weight.dtype == torch.float32 and all(torch.equal(rows, rows.to(dtype).float())
                                                 for rows in weight.detach().split(4096))


@contextlib.contextmanager
def head_held_narrow(head: nn.Module, enabled: bool):
    """Hold the frozen LM head's fp32 weight in bf16 while steps run under bf16 autocast, which casts it to bf16 for
    every product anyway: the very same logits, without the fp32 copy beside it (0.26 GB for a 32k x 2k head; 4.1
    GB for BLOOM's 250k x 4k, on the GPU) and without a fresh bf16 cast per chunk of rows. Only where the cast is
    exact (a checkpoint stored in bf16, streamed as fp32), so the fp32 weight comes back from it bit for bit."""
    weight = getattr(head, "weight", None)
    exact = enabled and isinstance(weight, torch.Tensor) and _exact_in(weight, torch.bfloat16)
    if not exact:
        yield
        return
    weight.data = weight.data.to(torch.bfloat16)  # a tied embedding shares it: the phase never runs the embedding
    try:
        yield
    finally:
        weight.data = weight.data.float()


@contextlib.contextmanager
def frozen_held_narrow(blocks: list[nn.Module], dtype: torch.dtype):
    """Hold the frozen blocks' fp32 matrices in `dtype` (the waiting fitted blocks', e.g. the bundle's bf16) while the
    low-rank KL phase runs through them, each product upcasting one matrix (_NarrowLinear): the top adapter blocks
    then cost what the fitted ones do, not twice that. Only matrices whose cast is exact (a checkpoint stored in bf16, streamed as fp32), so
    the same function bit for bit, and each is restored to fp32 after (an in-memory source lends its own blocks)."""
    held = []
    try:  # every matrix cast is restored, even if a later one's probe raises
        for block in blocks if dtype != torch.float32 else []:
            for name, (n_in, n_out) in block_linears(block).items():
                module = block.get_submodule(name)
                weight = module.weight
                if (weight.requires_grad or "forward" in module.__dict__ or not _plain_linear(module, n_in, n_out)
                        or not _exact_in(weight, dtype)):
                    continue
                weight.data = weight.data.to(dtype)
                module.forward = partial(_narrow_forward, module)
                held.append(module)
        yield
    finally:
        for module in held:
            module.__dict__.pop("forward", None)
            module.weight.data = module.weight.data.float()


class KLAt(NamedTuple):
    """Where the KL phase reads the full model: its emulator's input (the state entering block `first`), the
    bottom adapter's output (`bottom`, what --fit-kl-perturb perturbs), the top adapter's input (`interface`, or
    None) and the last block's output (`depth`)."""
    first: int
    bottom: int
    interface: int | None
    depth: int

    def wanted(self) -> list[int]:
        """The clean teacher pass's boundaries (the perturbed pass starts at `bottom`)."""
        return sorted({self.first, self.depth} | ({self.interface} if self.interface is not None else set()))


class KLViews(NamedTuple):
    """What the KL phase reads of the full model on one stream of public tokens, per batch: the emulator's input,
    the last block's output, the top adapter's input (or None), and the same with the bottom adapter perturbed
    (inputs, outputs, top adapter inputs; or None), with how far the noise moved the bottom adapter's output."""
    stream: Stream
    inputs: list[torch.Tensor]
    finals: list[torch.Tensor]
    interface: list[torch.Tensor] | None
    perturbed: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None] | None
    shift: float | None

    def items(self) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(batch, input, the teacher's last state, the teacher's state at the interface): clean, then perturbed."""
        def at(states: list[torch.Tensor] | None, k: int) -> torch.Tensor | None:
            return None if states is None else states[k]
        clean = [(k, self.inputs[k], self.finals[k], at(self.interface, k)) for k in range(len(self.inputs))]
        noisy = [] if self.perturbed is None else [
            (k, self.perturbed[0][k], self.perturbed[1][k], at(self.perturbed[2], k)) for k in range(len(self.inputs))]
        return clean + noisy


def kl_views(source: BlockSource, stream: Stream, at: KLAt, settings: FitSettings, seed: int,
             states: list[dict[int, torch.Tensor]] | None = None) -> KLViews:
    """The full model's states the KL phase reads on `stream` (from `states` where the block fit's teacher pass
    already holds them), and with `settings.kl_perturb` a second, perturbed pass (noise drawn from `seed`)."""
    states = states if states is not None else teacher_states(source, stream, at.wanted())
    inputs, finals = [s[at.first] for s in states], [s[at.depth] for s in states]
    interface = None if at.interface is None else [s[at.interface] for s in states]
    del states
    perturbed, shift = None, None
    if settings.kl_perturb:
        noisy = perturbed_states(source, stream, at.bottom, sorted({at.bottom, *at.wanted()}), settings.kl_perturb,
                                 seed)  # --fit-kl-perturb refuses --fit-align: first is bottom here
        perturbed = ([s[at.bottom] for s in noisy], [s[at.depth] for s in noisy],
                     None if interface is None else [s[at.interface] for s in noisy])
        shift = sum(float(relative_error(x, y)) for x, y in zip(perturbed[0], inputs)) / len(inputs)
    return KLViews(stream, inputs, finals, interface, perturbed, shift)


def kl_finish(source: BlockSource, train: KLViews, path: list[int], trained: dict[int, nn.Module],
              settings: FitSettings, progress: bool = False, log=None, interface: int | None = None,
              checkpoints: FitCheckpoints | None = None, measure: KLViews | None = None) -> dict:
    """Train the blocks in `trained` end to end: KL(full model || emulator) of the next-token distributions on
    `train`'s tokens. The emulator runs the original blocks `path` (those in `trained` as trained, the others
    frozen from the source), then the model's norm and head. Per batch, `train.inputs` is the full model's input to
    path[0] (the blocks before it are the model's) and `train.finals` its last block's output: the teacher's logits
    are recomputed from it at each step, a chunk of rows at a time with the student's (evaluate.head_kl): neither
    model's logits are held whole, nor cached (tokens x vocabulary floats). Returns the mean KL before and after,
    measured on `measure`'s tokens (public text the fit never read) or, without them, on `train`'s.

    The phase's change is kept only if it lowered that measurement. Held-out tokens judge what the owner ships -
    the emulator on text it was not trained on - and cost little: `emulate` measures on the guard's 1,024
    calibration tokens, where the two passes over the 16,384 training tokens took 68 of its 458 s (SmolLM2-135M,
    2-core CPU).

    `interface` = j: the loss also weighs (settings.kl_interface) the relative error between the state entering
    path[j] (the top adapter's input) and the full model's there (`train.interface`). The top adapter's gradients
    depend on nothing else the emulator changes, so this term pulls them toward the full model's; KL alone only
    asks the frozen top blocks' output to be right (measured on SmolLM2-135M: the plug-in ties at W 1, 10 and 100).
    Then the mean relative error before and after is returned too.

    `train.perturbed`: the full model with a perturbed bottom adapter (perturbed_states): each batch is also trained
    from those, so the emulator answers a change of the bottom adapter's output as the full middle does (a step per
    view: twice the steps). The KL on them before and after is returned as perturbed_before/after. Measured on
    SmolLM2-135M: the plug-in ties; the data owner's bottom adapter is spent repairing the emulator's error on its
    text, which this does not touch."""
    frozen = {i: source.block(i) for i in path if i not in trained}
    flags = {id(p): p.requires_grad for m in frozen.values() for p in m.parameters()}
    frozen_params = [p for m in frozen.values() for p in m.parameters()] + list(source.model.parameters())
    flags.update({id(p): p.requires_grad for p in source.model.parameters()})
    for p in frozen_params:
        p.requires_grad_(False)
    blocks = [trained[i] for i in path if i in trained]
    for m in blocks:  # measured in eval mode (no dropout, no router sampling), trained in train mode
        m.eval().requires_grad_(True)
    g = torch.Generator().manual_seed(settings.seed + 1)
    trainable, updates = low_rank_params(blocks, settings.kl_rank, g) if settings.kl_rank else \
        ([p for m in blocks for p in m.parameters()], [])
    # the low-memory path holds the frozen blocks (the top adapter's) as it holds the fitted ones: narrow
    waiting = next((p.dtype for m in blocks for p in m.parameters() if p.dim() >= 2), torch.float32)
    narrow_frozen = frozen_held_narrow(list(frozen.values()), waiting if settings.kl_rank else torch.float32)

    run = {**frozen, **trained}
    head, transform = backbone_and_head(source.model)[1], logit_transform(source.model.config)

    train_items = train.items()
    judge = measure if measure is not None else train

    def terms(on: KLViews, view: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:  # every position but 0, the
        k, h, final, target = view  # attention sink
        with torch.no_grad():
            teacher = final_states(source, on.stream, k, final)[:, 1:]
        at_interface = None
        for j, i in enumerate(path):
            if interface is not None and j == interface:
                at_interface = h
            if settings.kl_rank and i in trained and torch.is_grad_enabled():  # low memory: recompute, not keep
                h = checkpoint(partial(on.stream.run, run[i], batch=k, index=i), h, use_reentrant=False)
            else:
                h = on.stream.run(run[i], h, k, i)
        if interface is not None and interface == len(path):  # no top adapter: the emulator's output
            at_interface = h
        error = None if interface is None else relative_error(at_interface, target)
        return head_kl(final_states(source, on.stream, k, h)[:, 1:], teacher, head, transform), error

    def loss(v: int) -> torch.Tensor:
        kl, error = terms(train, train_items[v])
        return kl if error is None else kl + settings.kl_interface * error

    def means(items: list[tuple]) -> tuple[float, float | None]:
        with torch.no_grad():
            pairs = [terms(judge, view) for view in items]
        return (sum(float(a) for a, _ in pairs) / len(items),
                None if interface is None else sum(float(b) for _, b in pairs) / len(items))

    judged = judge.items()
    clean, noisy = judged[:len(judge.inputs)], judged[len(judge.inputs):]
    held_out = None if measure is None else sum(x.shape[0] * x.shape[1] for x in measure.inputs)

    def measured() -> tuple[tuple[float, float | None], tuple[float, float | None] | None]:
        return means(clean), (means(noisy) if noisy else None)

    def objective(c, n) -> float:  # what the steps minimise: each view's KL (+ W x the interface's error), averaged
        return sum(kl + settings.kl_interface * (err or 0.0) for kl, err in [c, *([n] if n else [])]) / (1 + bool(n))

    # what the KL phase changes in the blocks themselves, restored if it did not lower its objective where it is
    # measured (held out, or its own tokens): a low-rank
    # update is then dropped unmerged; all weights are copied first (4 bytes a parameter on that memory-heavy path)
    own = [p for m in blocks for p in m.parameters() if p.requires_grad]  # a low-rank update's are the hooks' own
    start = [p.detach().clone() for p in own]
    narrow_frozen.__enter__()  # left in the finally below
    try:
        first = measured()
        for m in blocks:
            m.train()
        with head_held_narrow(head, settings.precision == "bf16"):
            _train(trainable, loss, len(train_items), settings.kl_epochs, settings.kl_lr, settings.weight_decay, g,
                   "fit end to end (KL)" if progress else None, settings.precision == "bf16",
                   None if checkpoints is None else Keep(checkpoints, "kl-steps", "fit end to end (KL)", at_end=True))
        for m in blocks:
            m.eval().requires_grad_(False)
        # a low-rank update is judged before its merge, which a narrow dtype cannot undo exactly
        unmerged = measured() if updates else None
        reverted = bool(updates) and not objective(*unmerged) < objective(*first)  # nan too
        # into fp32 matrices the merge changes the function by rounding alone, so that measurement stands (a pass
        # fewer over the tokens it is measured on); a narrow dtype's merge
        # rounds the update itself away in part, so the blocks are measured again as they ship
        exact = all(module.weight.dtype == torch.float32 for module, _, _ in updates)
        merge_low_rank(updates, keep=not reverted)
        # merged blocks whose matrices wait narrow run as the guard runs them: a working fp32 copy per call
        run.update({i: Upcast(trained[i], torch.float32) for i in trained})
        last = first if reverted else unmerged if updates and exact else measured()
        if not updates:  # all weights: judged as they ship
            reverted = not objective(*last) < objective(*first)
        if reverted:  # the blocks as the block fit left them, measured as `first`
            with torch.no_grad():
                for p, value in zip(own, start):
                    p.copy_(value)
            last = first
        (before, error_before), (after, error_after) = first[0], last[0]
        noisy_before, noisy_after = (first[1][0], last[1][0]) if noisy else (None, None)
    finally:
        narrow_frozen.__exit__(None, None, None)
        for p in frozen_params:
            p.requires_grad_(flags[id(p)])
        for i in frozen:
            source.release(i)
    if log is not None:
        where = "its own tokens" if held_out is None else f"{held_out:,} held-out public tokens"
        log(f"fit end to end: KL(full || emulator) on {where} {before:.4g} -> {after:.4g}" + (
            " (the KL phase did not lower it: its change was dropped)" if reverted else "") + (
            "" if interface is None else f"; the top adapter's input, relative error {error_before:.4g} -> "
                                         f"{error_after:.4g}") + (
            "" if not noisy else f"; with the bottom adapter perturbed {noisy_before:.4g} -> {noisy_after:.4g}"))
    return {"before": before, "after": after, **({"reverted": True} if reverted else {}),
            **({} if held_out is None else {"held_out_tokens": held_out}),
            **({} if interface is None else {"interface_before": error_before, "interface_after": error_after}),
            **({} if not noisy else {"perturbed_before": noisy_before, "perturbed_after": noisy_after})}
