"""Data owner's role: tune the adapter blocks through the frozen emulator, ship an AdapterPackage.

Frozen: embeddings, head, final norm and the emulator's middle. The returned adapter is the one with
the best emulator validation perplexity (as the paper does), named by original block index.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from offsite_ds.bundle import Bundle, load_bundle, save_adapter_package
from offsite_ds.data import BlockLoader, check_seq_len, load_blocks
from offsite_ds.errors import OffsiteError
from offsite_ds.evaluate import token_nll
from offsite_ds.families import family_of
from offsite_ds.peft_modes import apply_mode, lora_target_regex, rename_blocks, trainable_state
from offsite_ds.plugin import adapter_blocks
from offsite_ds.roles.base import Role
from offsite_ds.train import TrainConfig, checkpoint_dir_beside, dist_rank, train


class TuneAdapter(Role):
    name = "tune"

    def __init__(self, bundle: Bundle, out_dir: str | Path, mode: str = "full", settings: dict | None = None,
                 eval_ids: torch.Tensor | None = None, seq_len: int = 512, eval_batch_size: int = 4,
                 data_fingerprint: str | None = None):
        super().__init__(bundle.model)
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
        if dist_rank()[0] != 0:
            return
        family = family_of(model)
        manifest = self.bundle.manifest
        position_to_original = {p: self.bundle.block_map[p] for p in self.bundle.adapter_positions}
        tensors = rename_blocks(trainable_state(model), family, position_to_original)
        peft_files = self._peft_export(tensors) if self.mode == "lora" else None
        save_adapter_package(tensors, {
            "family": manifest["family"], "model_type": manifest.get("model_type"),
            "base_depth": manifest["base_depth"], "base_fingerprint": manifest["base_fingerprint"],
            "bundle_fingerprint": self.bundle.fingerprint, "layout": manifest["layout"],
            "block_map": manifest["block_map"], "adapter_positions": manifest["adapter_positions"],
            "mode": self.mode, "mode_settings": self.settings,
            "training": {**{k: v for k, v in summary.items() if k != "loss_history"},
                         "data_fingerprint": self.data_fingerprint,
                         "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }, self.out_dir, peft_files=peft_files)

    def _peft_export(self, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
        """PEFT-format files so `PeftModel.from_pretrained(full_model, ADAPTER/peft)` works on the owner side."""
        from peft import LoraConfig
        from safetensors.torch import save as save_bytes

        family = family_of(self.model)
        config = LoraConfig(r=int(self.settings["r"]), lora_alpha=float(self.settings["alpha"]),
                            lora_dropout=float(self.settings["dropout"]),
                            target_modules=lora_target_regex(family, adapter_blocks(self.bundle.manifest),
                                                             self.settings["targets"]),
                            fan_in_fan_out=family.name == "gpt2", bias="none", task_type="CAUSAL_LM")
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            config_bytes = (Path(tmp) / "adapter_config.json").read_bytes()
        peft_tensors = {f"base_model.model.{name}": t.detach().cpu().contiguous() for name, t in tensors.items()}
        return {"adapter_config.json": config_bytes,
                "adapter_model.safetensors": save_bytes(peft_tensors, metadata={"format": "pt"})}


def tune(bundle_dir: str | Path, data: str | Path, out_dir: str | Path, mode: str = "full",
         settings: dict | None = None, cfg: TrainConfig | None = None, seq_len: int = 512,
         eval_data: str | Path | None = None, text_field: str = "text", kernels: str = "off",
         max_train_blocks: int | None = None, max_eval_tokens: int | None = None,
         train_loader=None) -> dict:
    """Data owner's `tune`: bundle + private corpus -> AdapterPackage at out_dir; returns the summary.

    `train_loader` replaces `data` with a ready loader (task-format examples, for instance).
    """
    cfg = cfg or TrainConfig()
    bundle = load_bundle(bundle_dir)
    check_seq_len(seq_len, bundle.model.config)
    rank, world = dist_rank()
    fingerprint = None
    if train_loader is None:
        blocks, fingerprint = load_blocks(data, bundle.tokenizer, seq_len, text_field, max_train_blocks)
        train_loader = BlockLoader(blocks, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank, world_size=world)
    eval_ids = None
    if eval_data is not None:
        eval_blocks, _ = load_blocks(eval_data, bundle.tokenizer, seq_len, text_field)
        eval_ids = eval_blocks.reshape(-1)[:max_eval_tokens] if max_eval_tokens else eval_blocks.reshape(-1)
    torch.manual_seed(cfg.seed)  # LoRA / bottleneck initialisation is part of the run: seed it too
    role = TuneAdapter(bundle, out_dir, mode, settings, eval_ids, seq_len, data_fingerprint=fingerprint)
    if _kernels_wanted(kernels):
        from offsite_ds.kernels import patch

        patch(bundle.model)
    cfg.checkpoint_dir = cfg.checkpoint_dir or checkpoint_dir_beside(out_dir)
    return train(role, train_loader, cfg)


def _kernels_wanted(choice: str) -> bool:
    if choice == "off":
        return False
    try:
        from offsite_ds.kernels import kernels_enabled
    except ImportError as exc:
        if choice == "on":
            raise OffsiteError(f"--kernels on: the Triton kernels are unavailable ({exc}); use --kernels off")
        return False
    return kernels_enabled(choice)
