"""Data owner's role: tune the adapter blocks through the frozen emulator, ship an AdapterPackage.

Frozen: embeddings, head, final norm and the emulator's middle. The returned adapter is the one with
the best emulator validation perplexity (as the paper does), named by original block index.
"""
from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from offsite_ds.adapter_package import PEFT_PREFIX, save_adapter_package
from offsite_ds.atomic import utc_stamp
from offsite_ds.bundle import Bundle, load_bundle
from offsite_ds.data import check_seq_len, load_blocks
from offsite_ds.errors import OffsiteError
from offsite_ds.evaluate import token_nll
from offsite_ds.families import family_of
from offsite_ds.manifests import ModeSettings
from offsite_ds.peft_modes import apply_mode, lora_config, rename_blocks, trainable_state
from offsite_ds.roles.base import Role
from offsite_ds.runtime import Runtime
from offsite_ds.train import TrainConfig, for_output, train
from offsite_ds.zero3 import gathered

DEFAULT_TUNE_LR = 1e-4  # without --lr and without the owner's advice (BundleManifest.advice) for the mode
DEFAULT_KERNELS = "auto"  # on CUDA the library kernels measured best, else off: the CLI's default and the API's


class TuneAdapter(Role):
    name = "tune"

    def __init__(self, bundle: Bundle, out_dir: str | Path, mode: str = "full", settings: ModeSettings | None = None,
                 eval_ids: torch.Tensor | None = None, seq_len: int = 512, eval_batch_size: int = 4,
                 data_fingerprint: str | None = None, runtime: Runtime | None = None, lr: dict | None = None):
        super().__init__(bundle.model, runtime)
        self.lr_record = lr or {}  # {"lr", "lr_from"}: recorded in the package's training record
        self.bundle, self.out_dir = bundle, Path(out_dir)
        self.mode = mode
        self.settings = apply_mode(bundle.model, bundle.adapter_positions, mode, settings)
        self.eval_ids, self.seq_len, self.eval_batch_size = eval_ids, seq_len, eval_batch_size
        self.data_fingerprint = data_fingerprint

    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None:
        if self.eval_ids is None:
            return None
        nll, count = token_nll(model, self.eval_ids, self.seq_len, self.seq_len, self.eval_batch_size)
        return {"eval_loss": nll / count, "eval_ppl": math.exp(nll / count)}

    def export(self, model: torch.nn.Module, summary: dict) -> None:
        """Gather the trainable tensors (collective under ZeRO-3: every rank calls this, a partitioned
        parameter is an empty shard until gathered) and write the AdapterPackage on rank 0."""
        with gathered([p for p in model.parameters() if p.requires_grad]):
            state = ({n: t.to("cpu", copy=True) for n, t in trainable_state(model).items()}
                     if self.runtime.is_main else None)
        if not self.runtime.is_main:
            return
        family = family_of(model)
        manifest = self.bundle.manifest
        tensors = rename_blocks(state, family, self.bundle.position_to_original)
        peft_files = self._peft_export(tensors) if self.mode == "lora" else None
        save_adapter_package(tensors, {
            "family": manifest.family, "model_type": manifest.model_type,
            "base_depth": manifest.base_depth, "base_fingerprint": manifest.base_fingerprint,
            "bundle_fingerprint": self.bundle.fingerprint, "layout": manifest.layout,
            "block_map": manifest.block_map, "adapter_positions": manifest.adapter_positions,
            "mode": self.mode, "mode_settings": self.settings, "aligned": self.bundle.manifest.aligned,
            "training": {**{k: v for k, v in summary.items() if k != "loss_history"},
                         "data_fingerprint": self.data_fingerprint, **self.lr_record,
                         "exported_at": utc_stamp()},
        }, self.out_dir, peft_files=peft_files)

    def _peft_export(self, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
        """PEFT-format files so `PeftModel.from_pretrained(full_model, ADAPTER/peft)` works on the owner side."""
        from safetensors.torch import save as save_bytes

        # the same config as training's, at the full model's block indices
        config = lora_config(self.model, self.bundle.manifest.adapter_blocks, self.settings, task_type="CAUSAL_LM")
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            config_bytes = (Path(tmp) / "adapter_config.json").read_bytes()
        peft_tensors = {f"{PEFT_PREFIX}{name}": t.detach().cpu().contiguous() for name, t in tensors.items()}
        return {"adapter_config.json": config_bytes,
                "adapter_model.safetensors": save_bytes(peft_tensors, metadata={"format": "pt"})}


def tune(bundle_dir: str | Path, data: str | Path | None, out_dir: str | Path, mode: str = "full",
         settings: ModeSettings | None = None, cfg: TrainConfig | None = None, seq_len: int = 512,
         eval_data: str | Path | None = None, text_field: str = "text", kernels: str = DEFAULT_KERNELS,
         max_train_blocks: int | None = None, max_eval_tokens: int | None = None, task: str | None = None,
         task_split: str = "train", include_path: list[str] | None = None,
         max_examples: int | None = None, runtime: Runtime | None = None) -> dict:
    """Data owner's `tune`: bundle + private corpus (or a task's examples) -> AdapterPackage at out_dir.

    Exactly one of `data` (a corpus) and `task` (an lm-eval task name, a local YAML task or a .jsonl of
    question/choices/answer records: tuned with the prompt masked out of the loss) is given. Returns the
    training summary.
    """
    if (data is None) == (task is None):
        raise OffsiteError("pass exactly one of --data FILE (a corpus) or --task TASK (task-format examples)")
    cfg = for_output(cfg or TrainConfig(lr=None), out_dir)
    if kernels != "off":  # resolved (and a refusal raised) before any work; "off", "ours", "liger" or "cce" after
        from offsite_ds.ds_config import is_zero3, load_ds_config
        from offsite_ds.kernels import kernels_for_training

        kernels = kernels_for_training(kernels, zero3=cfg.deepspeed is not None
                                       and is_zero3(load_ds_config(cfg.deepspeed)))
    with contextlib.ExitStack() as stack:  # a Runtime of our own when the caller did not pass one
        if runtime is None:
            runtime = stack.enter_context(Runtime.from_config(cfg))
        bundle = load_bundle(bundle_dir)  # validated before its tokenizer or weights are used
        lr_from = "given"
        if cfg.lr is None:
            advised = bundle.manifest.advised_lr(mode)
            lr_from = "probe" if advised is not None else "default"
            cfg = replace(cfg, lr=advised or DEFAULT_TUNE_LR)
        check_seq_len(seq_len, bundle.model.config)
        fingerprint = None
        if task is not None:
            from offsite_ds.task_data import task_loader

            loader = task_loader(task, bundle.tokenizer, cfg.batch_size, split=task_split, include_path=include_path,
                                 max_length=seq_len, limit=max_examples, seed=cfg.seed, rank=runtime.rank,
                                 world_size=runtime.world)
        else:
            blocks, fingerprint = load_blocks(data, bundle.tokenizer, seq_len, text_field, max_train_blocks)
            loader = runtime.block_loader(blocks, cfg)
        eval_ids = None
        if eval_data is not None:
            eval_blocks, _ = load_blocks(eval_data, bundle.tokenizer, seq_len, text_field)
            eval_ids = eval_blocks.reshape(-1)[:max_eval_tokens] if max_eval_tokens else eval_blocks.reshape(-1)
        if runtime.is_main and lr_from != "given":  # once the data is read: a bad input fails in one line first
            why = ("the owner's probe, recorded in the bundle" if lr_from == "probe"
                   else f"the default: the bundle holds no probed lr for --mode {mode}")
            print(f"tune: lr {cfg.lr:g} ({why}; --lr overrides)", file=sys.stderr)
        torch.manual_seed(cfg.seed)  # LoRA / bottleneck initialisation is part of the run: seed it too
        role = TuneAdapter(bundle, out_dir, mode, settings, eval_ids, seq_len, data_fingerprint=fingerprint,
                           runtime=runtime, lr={"lr": cfg.lr, "lr_from": lr_from})
        if kernels != "off":
            from offsite_ds.kernels import patch_for_training

            patch_for_training(bundle.model, kernels)
        return train(role, loader, cfg, runtime)

