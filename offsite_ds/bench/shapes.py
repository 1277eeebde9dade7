"""Model shapes for the benchmark: the real configs of the paper's models, built with random weights.

The configs are written out here (copied from the public config.json files) so that benchmarking never
downloads anything. A local config file or model directory works too. `--smoke` swaps each shape for a
tiny one of the same family and depth, so the same layouts apply on a CPU in seconds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from offsite_ds.errors import OffsiteError

# name -> (model_type, config fields, the paper's OT layout for it)
BUILTIN: dict[str, tuple[str, dict, str]] = {
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                             word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048,
                             do_layer_norm_before=True, activation_function="relu", dropout=0.1,
                             attention_dropout=0.0, activation_dropout=0.0, enable_bias=True,
                             pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True),
                 "2-8-2"),
    "opt-6.7b": ("opt", dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                             word_embed_proj_dim=4096, vocab_size=50272, max_position_embeddings=2048,
                             do_layer_norm_before=True, activation_function="relu", dropout=0.1,
                             attention_dropout=0.0, activation_dropout=0.0, enable_bias=True,
                             pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True),
                 "2-18-2"),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257,
                             activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                             layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256,
                             tie_word_embeddings=True),
                "2-16-2"),
    "bloom-7b1": ("bloom", dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880,
                                layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False,
                                hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
                                pad_token_id=3, tie_word_embeddings=True),
                  "2-12-2"),
}
DEPTH_KEYS = ("num_hidden_layers", "n_layer")
TINY_LAYOUT = "2-4-2"  # for tiny-<family> shapes (default depth 12)


@dataclass
class ModelShape:
    """A model to benchmark: its config (random weights are built from it) and the paper's layout."""

    name: str
    config: PretrainedConfig
    default_layout: str | None
    tiny: bool = False

    @property
    def depth(self) -> int:
        return depth_of_config(self.config)

    @property
    def model_type(self) -> str:
        return self.config.model_type


def depth_of_config(config: PretrainedConfig) -> int:
    for key in DEPTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise OffsiteError(f"config of model type '{config.model_type}' names no depth ({' or '.join(DEPTH_KEYS)})")


def family_of_config(config: PretrainedConfig):
    """The family table's entry for a config, checked on a meta-device model (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from offsite_ds.families import family_of

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return family_of(model)


def _finish(config: PretrainedConfig) -> PretrainedConfig:
    config.use_cache = False  # training: no KV cache
    return config


def resolve_shape(spec: str, smoke: bool = False) -> ModelShape:
    """A built-in name (opt-1.3b, opt-6.7b, gpt2-xl, bloom-7b1), `tiny-<family>[:depth]`, or a local config."""
    if spec in BUILTIN:
        model_type, fields, layout = BUILTIN[spec]
        shape = ModelShape(spec, _finish(AutoConfig.for_model(model_type, **copy.deepcopy(fields))), layout)
    elif spec.startswith("tiny-"):
        from offsite_ds.tiny import TINY_FAMILIES, tiny_config

        family, _, depth = spec[len("tiny-"):].partition(":")
        if family not in TINY_FAMILIES or (depth and not depth.isdigit()):
            raise OffsiteError(f"unknown tiny shape '{spec}'; use tiny-<family>[:depth] with family one of "
                               f"{', '.join(TINY_FAMILIES)}")
        return ModelShape(spec, _finish(tiny_config(family, n_layers=int(depth or 12))), TINY_LAYOUT, tiny=True)
    else:
        shape = ModelShape(Path(spec).name.removesuffix(".json") or spec, _local_config(spec), None)
    return tiny_twin(shape) if smoke else shape


def _local_config(spec: str) -> PretrainedConfig:
    path = Path(spec)
    if not path.exists():
        raise OffsiteError(f"unknown model '{spec}': use one of {', '.join(BUILTIN)}, tiny-<family>, "
                           "or a local config.json / model directory")
    if path.is_dir() and not (path / "config.json").is_file():
        raise OffsiteError(f"{path} has no config.json; pass a model directory or a config file")
    try:
        if path.is_file():
            import json

            fields = json.loads(path.read_text())
            model_type = fields.pop("model_type", None)
            if not model_type:
                raise OffsiteError(f"{path} has no 'model_type'; it is not a Hugging Face config")
            config = AutoConfig.for_model(model_type, **fields)
        else:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise OffsiteError(f"cannot read a model config from {path}: {str(exc).splitlines()[0]}")
    return _finish(config)


def tiny_twin(shape: ModelShape) -> ModelShape:
    """The same family and depth at toy width (hidden 32, vocab 258): for the CPU smoke mode."""
    if shape.tiny:
        return shape
    from offsite_ds.tiny import TINY_FAMILIES, tiny_config

    family = family_of_config(shape.config).name
    config = _finish(tiny_config(family if family in TINY_FAMILIES else "llama", n_layers=shape.depth))
    return ModelShape(f"{shape.name} (tiny)", config, shape.default_layout, tiny=True)
