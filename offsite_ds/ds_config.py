"""DeepSpeed configs: load a stock JSON (or a user's), fill its "auto" values from the run's settings.

One source of truth for batch sizes, accumulation, clipping, precision and the optimizer: the
TrainConfig the loop uses. A ds config may say "auto" (filled here, as the HF Trainer does) or a
concrete value, which must then agree with the run's setting - a silent disagreement would make
DeepSpeed train with a batch size or learning rate other than the one the user asked for.
Bucket sizes follow the HF Trainer's rule from the model's hidden size.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from offsite_ds.errors import OffsiteError
from offsite_ds.resources import resource_dir

CONFIG_DIR = resource_dir("ds_configs", "zero3.json")  # the repo's ds_configs/, or its copy in a wheel
STOCK_CONFIGS = ("zero3", "zero3_offload", "zero2", "single_gpu")
ADAM_BETAS = [0.9, 0.999]  # both engines: DeepSpeed's optimizer (filled here) and the torch engine's AdamW
ADAM_EPS = 1e-8


def resolve_config_path(source: str | Path) -> Path:
    """A path to a JSON file, or the name of a stock config in ds_configs/ (e.g. 'zero3')."""
    path = Path(source)
    if path.is_file():
        return path
    stock = CONFIG_DIR / f"{Path(str(source)).stem}.json"
    if str(source).removesuffix(".json") in STOCK_CONFIGS and stock.is_file():
        return stock
    raise OffsiteError(f"DeepSpeed config '{source}' not found; pass a JSON file or one of "
                       f"{', '.join(STOCK_CONFIGS)} (in {CONFIG_DIR})")


def load_ds_config(source: str | Path | dict) -> dict:
    """A fresh copy of a ds config (never the caller's dict: filling must not leak between runs)."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = resolve_config_path(source)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OffsiteError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); fix the DeepSpeed config")
    if not isinstance(config, dict):
        raise OffsiteError(f"{path}: a DeepSpeed config must be a JSON object")
    return config


def zero_stage(ds_config: dict) -> int:
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise OffsiteError(f"zero_optimization.stage {stage!r} must be 0, 1, 2 or 3")
    return int(stage)


def is_zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and zero_stage(ds_config) == 3


def offload_devices(ds_config: dict) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded), to CPU or NVMe."""
    zero = ds_config.get("zero_optimization", {})

    def on(key: str) -> bool:
        return zero.get(key, {}).get("device", "none") not in ("none", None)

    return on("offload_optimizer"), on("offload_param")


def hidden_size_of(model_config) -> int | None:
    """The hidden size the HF Trainer sizes ZeRO buckets by (largest of `hidden_sizes` if a list)."""
    if model_config is None:
        return None
    for holder in (model_config, getattr(model_config, "text_config", None)):
        if holder is None:
            continue
        if isinstance(getattr(holder, "hidden_size", None), int):
            return holder.hidden_size
        sizes = getattr(holder, "hidden_sizes", None)
        if isinstance(sizes, (list, tuple)) and sizes:
            return max(sizes)
    return None


class _Filler:
    """Walks dotted keys: fills "auto", checks that concrete values agree with the run's settings."""

    def __init__(self, config: dict):
        self.config = config
        self.mismatches: list[str] = []

    def node(self, dotted: str) -> tuple[dict | None, str]:
        *parents, leaf = dotted.split(".")
        node = self.config
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                return None, leaf
        return node, leaf

    def fill(self, dotted: str, value, setting: str, must_match: bool = True) -> None:
        node, leaf = self.node(dotted)
        if node is None or leaf not in node:
            return
        if node[leaf] == "auto":
            node[leaf] = value
        elif must_match and node[leaf] != value:
            self.mismatches.append(f"{dotted}={node[leaf]!r} but {setting} gives {value!r}")


def remaining_autos(config, prefix: str = "") -> list[str]:
    if isinstance(config, dict):
        return [k for key, v in config.items() for k in remaining_autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if config == "auto" else []


def build_ds_config(source: str | Path | dict, cfg, model_config=None, *, world: int, bf16: bool,
                    announce: bool = True) -> dict:
    """The ds config `source` with every "auto" filled from `cfg` (a TrainConfig) and the model's config.

    Idempotent: filling an already filled config checks it again and changes nothing. `world` and `bf16`
    are the Runtime's facts, passed in (this module sits below the Runtime and never asks the process). `cfg.torch_adam` swaps DeepSpeed's
    fused/CPU Adam for torch's AdamW through the optimizer's own `torch_adam` switch - no JIT op build,
    for CPU tests and try-outs. `announce`: print notes (rank 0 only).
    """
    config = load_ds_config(source)
    stage = zero_stage(config)
    filler = _Filler(config)
    filler.fill("train_micro_batch_size_per_gpu", cfg.batch_size, "--batch-size")
    filler.fill("gradient_accumulation_steps", cfg.grad_accum, "--grad-accum")
    filler.fill("train_batch_size", cfg.batch_size * cfg.grad_accum * world,
                f"--batch-size x --grad-accum x {world} rank(s)")
    filler.fill("gradient_clipping", float(cfg.max_grad_norm or 0.0), "--max-grad-norm")
    filler.fill("optimizer.params.lr", cfg.lr, "--lr")
    filler.fill("optimizer.params.betas", ADAM_BETAS, "the AdamW betas")
    filler.fill("optimizer.params.eps", ADAM_EPS, "the AdamW eps")
    filler.fill("optimizer.params.weight_decay", cfg.weight_decay, "--weight-decay")
    filler.fill("bf16.enabled", bf16, f"--precision {cfg.precision}", must_match=cfg.precision != "auto")
    filler.fill("fp16.enabled", False, "offsite-ds (fp16 is not used; bf16 or fp32)")
    if config.get("fp16", {}).get("enabled") is True:
        raise OffsiteError("fp16 is not supported by offsite-ds (bf16 on GPUs that have it, fp32 otherwise); "
                           "set fp16.enabled to false in the DeepSpeed config")
    hidden = hidden_size_of(model_config)
    bucket_keys = {"zero_optimization.reduce_bucket_size": (lambda h: h * h),
                   "zero_optimization.stage3_prefetch_bucket_size": (lambda h: int(0.9 * h * h)),
                   "zero_optimization.stage3_param_persistence_threshold": (lambda h: 10 * h)}
    if hidden is not None:
        for key, rule in bucket_keys.items():
            filler.fill(key, rule(hidden), "the hidden size", must_match=False)
    if filler.mismatches:
        raise OffsiteError("the DeepSpeed config disagrees with the run's settings: " + "; ".join(filler.mismatches)
                           + ' (set these to "auto" in the config, or pass matching options)')
    if "scheduler" in config:
        # deepspeed.initialize prefers the loop's client scheduler; drop the section so the config says what runs
        config.pop("scheduler")
        if announce:
            print("offsite-ds: the DeepSpeed config's 'scheduler' is ignored: the training loop's linear warm-up + "
                  "cosine schedule (--lr, --warmup) is the one schedule", file=sys.stderr)
    if cfg.torch_adam and "optimizer" in config:
        if config["optimizer"].get("type", "").lower() not in ("adam", "adamw"):
            raise OffsiteError(f"--torch-adam replaces Adam/AdamW, but the config's optimizer is "
                               f"{config['optimizer'].get('type')!r}")
        config["optimizer"].setdefault("params", {})["torch_adam"] = True
    left = remaining_autos(config)
    if left:
        need = " (the model's hidden size is unknown)" if any(k in bucket_keys for k in left) else ""
        raise OffsiteError(f'cannot fill "auto" for {", ".join(left)}{need}; put numbers there in the DeepSpeed config')
    if stage < 2 and any(offload_devices(config)):
        raise OffsiteError(f"offload needs ZeRO stage 2 or 3, the config has stage {stage}")
    if stage < 3 and offload_devices(config)[1]:
        raise OffsiteError("parameter offload (offload_param) needs ZeRO stage 3")
    return config
