"""The paper's models, one table: their configs (copied from the public config.json files, so planning
and benchmarking never download anything) and the Offsite-Tuning layout the paper used for each; plus
the one reader of a local config file or model directory.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path

from offsite_ds.errors import OffsiteError

_OPT = dict(max_position_embeddings=2048, vocab_size=50272, do_layer_norm_before=True, activation_function="relu",
            dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, enable_bias=True, pad_token_id=1,
            bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)  # what OPT-1.3B and OPT-6.7B share

# name -> (model_type, config fields, the paper's OT layout for it)
PAPER_MODELS: dict[str, tuple[str, dict, str]] = {
    "opt-1.3b": ("opt", dict(_OPT, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                             word_embed_proj_dim=2048), "2-8-2"),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257,
                             activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                             layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256,
                             tie_word_embeddings=True),
                "2-16-2"),
    "opt-6.7b": ("opt", dict(_OPT, hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                             word_embed_proj_dim=4096), "2-18-2"),
    "bloom-7b1": ("bloom", dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880,
                                layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False,
                                hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
                                pad_token_id=3, tie_word_embeddings=True),
                  "2-12-2"),
}


def paper_config(name: str):
    """A fresh transformers config of one of the paper's models."""
    from transformers import AutoConfig

    model_type, fields, _ = PAPER_MODELS[name]
    return AutoConfig.for_model(model_type, **copy.deepcopy(fields))


def paper_layout(name: str) -> str | None:
    return PAPER_MODELS[name][2] if name in PAPER_MODELS else None


def mlp_dims(name: str) -> tuple[int, int, int, str]:
    """(hidden, vocab, MLP width, MLP activation) of a paper model: what the kernel benchmarks size by."""
    from offsite_ds.families import family_by_name

    model_type, fields, _ = PAPER_MODELS[name]
    config = paper_config(name)
    hidden = int(config.hidden_size)
    ffn = int(getattr(config, "ffn_dim", None) or getattr(config, "n_inner", None) or 4 * hidden)
    return hidden, int(config.vocab_size), ffn, family_by_name(model_type).activation


def read_model_config(spec: str | Path, known: Iterable[str] = ()):
    """A name of `known` aside, the config at `spec`: a config.json file or a model directory holding one."""
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OffsiteError(f"{path} has no config.json; pass a model directory or a config file")
        path = path / "config.json"
    if not path.is_file():
        raise OffsiteError(f"unknown model '{spec}': pass one of {', '.join(known)} or a local config.json / "
                           "model directory")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OffsiteError(f"{path}: not valid JSON ({exc.msg})")
    model_type = fields.pop("model_type", None) if isinstance(fields, dict) else None
    if not model_type:
        raise OffsiteError(f"{path}: no model_type; pass a Hugging Face config.json")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, OSError) as exc:
        raise OffsiteError(f"cannot read a model config from {path}: {str(exc).splitlines()[0]}")
