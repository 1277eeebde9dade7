"""The contract between a role and the one training loop (offsite_ds.train.train)."""
from __future__ import annotations

from pathlib import Path

import torch

from offsite_ds.runtime import Runtime


class Role:
    """A training role. Subclasses set `name`, freeze what they must, and implement `export`.

    `model` is the nn.Module the engine wraps (DeepSpeed or plain torch); the loop calls
    `compute_loss(engine, batch)` with the engine as a callable model, `evaluate(module)` every
    `eval_every` steps and at the end (on every rank), and `export(module, summary)` whenever the
    evaluation improves (or at the end when `evaluate` returns None). Per-micro-batch metrics returned
    by `compute_loss` are averaged over each optimizer step by the loop (the summary's `final_metrics`).
    `runtime` says which rank writes exports (a plain one-process Runtime when not given).
    """

    name = "train"

    def __init__(self, model: torch.nn.Module, runtime: Runtime | None = None):
        self.model = model
        self.runtime = runtime or Runtime()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Causal-LM cross-entropy (HF shifts labels inside the model)."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        return out.loss, {}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float] | None:
        return None

    def export(self, model: torch.nn.Module, summary: dict) -> None:
        raise NotImplementedError


def owner_corpus(runtime: Runtime, cfg, model_dir: str | Path, tokenizer_dir: str | Path, data: str | Path,
                 seq_len: int, text_field: str = "text", max_blocks: int | None = None):
    """What an owner's large-model role (distill, finetune) needs before its model is built: the model dir
    checked and the ds config filled from its config (so ZeRO-3 builds it sharded), the tokenizer, and
    this rank's loader over the packed corpus. Returns (tokenizer, loader, corpus fingerprint)."""
    from transformers import AutoTokenizer

    from offsite_ds.data import load_blocks

    runtime.prepare_model(cfg, model_dir, seq_len)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, trust_remote_code=False)
    blocks, fingerprint = load_blocks(data, tokenizer, seq_len, text_field, max_blocks)
    return tokenizer, runtime.block_loader(blocks, cfg), fingerprint
