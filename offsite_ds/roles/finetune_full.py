"""Owner's baseline role: fine-tune the whole model (FT) or LoRA on every block (FT+LoRA).

The paper's FT row, which it could not run at 6.7B: under ZeRO-3 the full model is built sharded and
trained by a DeepSpeed engine. The result is a plain HF model directory (LoRA merged into the weights)
that `from_pretrained`, `offsite-ds eval` and lm-eval load as they are.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from offsite_ds.atomic import atomic_dir, utc_stamp, write_json
from offsite_ds.data import load_blocks
from offsite_ds.evaluate import token_nll
from offsite_ds.families import blocks_of, family_of
from offsite_ds.manifests import (FINETUNED_FORMAT, MANIFEST, FinetunedManifest, LoraSettings, ModeSettings, NoSettings,
                                  dump)
from offsite_ds.peft_modes import apply_mode, lora_layers, merge_lora_state
from offsite_ds.roles.base import Role, owner_corpus
from offsite_ds.runtime import Runtime
from offsite_ds.train import TrainConfig, for_output, train
from offsite_ds.zero3 import enable_activation_checkpointing, gathered_state_dict



class FinetuneFull(Role):
    name = "finetune"

    def __init__(self, model: nn.Module, tokenizer, out_dir: str | Path, mode: str, settings: ModeSettings,
                 record: dict, eval_ids: torch.Tensor | None = None, seq_len: int = 512, eval_batch_size: int = 4,
                 runtime: Runtime | None = None):
        super().__init__(model, runtime)
        self.tokenizer, self.out_dir = tokenizer, Path(out_dir)
        self.mode, self.settings, self.record = mode, settings, record
        self.eval_ids, self.seq_len, self.eval_batch_size = eval_ids, seq_len, eval_batch_size

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        if self.eval_ids is None:
            return None
        nll, count = token_nll(model, self.eval_ids, self.seq_len, self.seq_len, self.eval_batch_size)
        return {"eval_loss": nll / count, "eval_ppl": math.exp(nll / count)}

    def export(self, model: nn.Module, summary: dict) -> None:
        """Gather (collective: every rank calls this), merge LoRA, write a plain HF dir on rank 0."""
        layers = lora_layers(model) if self.mode == "lora" else {}
        state = gathered_state_dict(model, to_rank=0)
        if not self.runtime.is_main:
            return
        if layers:
            state = merge_lora_state(state, layers)
        with atomic_dir(self.out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / MANIFEST, dump(FinetunedManifest.model_validate({
                "format": FINETUNED_FORMAT, "version": 1, "mode": "ft+lora" if layers else "ft",
                "mode_settings": self.settings, **self.record,
                "training": {**{k: v for k, v in summary.items() if k != "loss_history"},
                             "exported_at": utc_stamp()},
            })))


def finetune(model_dir: str | Path, data: str | Path, out_dir: str | Path, lora: bool = False,
             lora_settings: LoraSettings | None = None, cfg: TrainConfig | None = None, seq_len: int = 512,
             eval_data: str | Path | None = None, text_field: str = "text", max_train_blocks: int | None = None,
             max_eval_tokens: int | None = None, gradient_checkpointing: bool = False) -> dict:
    """Owner's `finetune`: the full model (sharded under ZeRO-3) trained on a corpus -> plain HF dir at out_dir."""
    cfg = for_output(cfg or TrainConfig(), out_dir)
    with Runtime.from_config(cfg) as runtime:
        tokenizer, loader, fingerprint = owner_corpus(runtime, cfg, model_dir, model_dir, data, seq_len, text_field,
                                                      max_train_blocks)
        eval_ids = None
        if eval_data is not None:
            eval_blocks, _ = load_blocks(eval_data, tokenizer, seq_len, text_field)
            eval_ids = eval_blocks.reshape(-1)[:max_eval_tokens] if max_eval_tokens else eval_blocks.reshape(-1)
        model = runtime.load_model(model_dir)
        settings: ModeSettings = NoSettings()
        torch.manual_seed(cfg.seed)  # LoRA's initial A matrices: the same on every run (and rank)
        if lora:
            settings = apply_mode(model, list(range(len(blocks_of(model)))), "lora", lora_settings)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        if gradient_checkpointing:
            enable_activation_checkpointing(model)
        record = {"family": family_of(model).name, "base_model": str(model_dir), "data_fingerprint": fingerprint,
                  "world_size": runtime.world, "seq_len": seq_len}
        role = FinetuneFull(model, tokenizer, out_dir, "lora" if lora else "full", settings, record, eval_ids,
                            seq_len, runtime=runtime)
        return train(role, loader, cfg, runtime)
