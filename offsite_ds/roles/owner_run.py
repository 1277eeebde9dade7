"""What the owner's large-model roles (distill, finetune) share before training: the corpus, the
distributed set-up, and the DeepSpeed config that must be live before the model is built sharded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offsite_ds.data import BlockLoader, check_seq_len, load_blocks
from offsite_ds.errors import OffsiteError
from offsite_ds.train import TrainConfig, dist_rank
from offsite_ds.zero3 import activate_zero3, init_distributed


@dataclass
class OwnerRun:
    tokenizer: object
    model_config: object
    loader: BlockLoader
    data_fingerprint: str
    rank: int
    world: int
    keep_alive: object  # HfDeepSpeedConfig: must outlive model building and export under ZeRO-3


def prepare_owner_run(model_dir: str | Path, tokenizer_dir: str | Path, data: str | Path, cfg: TrainConfig,
                      seq_len: int, text_field: str = "text", max_train_blocks: int | None = None) -> OwnerRun:
    """Check the model dir, pack the corpus for this rank, and fill + activate the ds config (if any)."""
    from transformers import AutoConfig, AutoTokenizer

    from offsite_ds.ds_config import build_ds_config

    if not (Path(model_dir) / "config.json").is_file():
        raise OffsiteError(f"{model_dir} is not a Hugging Face model directory (no config.json); pass the full model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, trust_remote_code=False)
    model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    check_seq_len(seq_len, model_config)
    if cfg.deepspeed:
        init_distributed()
    rank, world = dist_rank()
    blocks, fingerprint = load_blocks(data, tokenizer, seq_len, text_field, max_train_blocks)
    loader = BlockLoader(blocks, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank, world_size=world)
    keep_alive = None
    if cfg.deepspeed:
        cfg.deepspeed = build_ds_config(cfg.deepspeed, cfg, model_config=model_config,
                                        total_steps=cfg.total_steps(len(loader)))
        keep_alive = activate_zero3(cfg.deepspeed)
    return OwnerRun(tokenizer, model_config, loader, fingerprint, rank, world, keep_alive)
