"""Architecture facts, one table: the only place in the toolkit that knows model families by name.

Everything else asks this module where the blocks live, which modules are the embeddings, the final
norm and the head, and which linear layers bottleneck adapters and LoRA attach to.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from offsite_ds.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """Where things live inside one family of HF causal LMs (dotted attribute paths)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    final_norm: str
    head: str
    embeddings: tuple[str, ...]
    attn_out: str  # projection that ends the attention sub-layer (inside a block)
    mlp_out: str  # projection that ends the MLP sub-layer (inside a block)
    lora_targets: tuple[str, ...]  # default LoRA target module names (the paper's q/v setting)
    mlp_in: str = ""  # first MLP projection (its bias feeds the activation)
    activation: str = ""  # the MLP activation, for the fused bias+activation kernel
    extra: dict = field(default_factory=dict)
    mlp_gated: tuple[str, ...] = ()  # a gated MLP's input projections (mlp_in is then "": no bias+activation to fuse)

    @property
    def mlp_channels(self) -> tuple[str, ...]:
        """The MLP's input projections, whose outputs are its channels (offsite_ds.narrow); () where unknown."""
        return self.mlp_gated or ((self.mlp_in,) if self.mlp_in else ())


FAMILIES: tuple[Family, ...] = (
    Family(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        head="lm_head",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions",
                    "model.decoder.project_in", "model.decoder.project_out"),
        attn_out="self_attn.out_proj",
        mlp_out="fc2",
        mlp_in="fc1",
        activation="relu",
        lora_targets=("q_proj", "v_proj"),
    ),
    Family(
        name="bloom",
        model_types=("bloom",),
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        head="lm_head",
        embeddings=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
        attn_out="self_attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        mlp_in="mlp.dense_h_to_4h",
        activation="gelu_tanh",
        lora_targets=("query_key_value",),
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        head="lm_head",
        embeddings=("transformer.wte", "transformer.wpe"),
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        mlp_in="mlp.c_fc",
        activation="gelu_tanh",
        lora_targets=("c_attn",),
    ),
    Family(  # Pythia, GPT-NeoX-20B: one fused QKV, parallel residual; old checkpoints name the head embed_out
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        head="lm_head",
        embeddings=("gpt_neox.embed_in", "gpt_neox.rotary_emb"),
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        mlp_in="mlp.dense_h_to_4h",
        activation="gelu",
        lora_targets=("query_key_value",),
    ),
    Family(  # phi-1, phi-1.5, phi-2: attention and MLP side by side after one LayerNorm
        name="phi",
        model_types=("phi",),
        blocks="model.layers",
        final_norm="model.final_layernorm",
        head="lm_head",
        embeddings=("model.embed_tokens", "model.rotary_emb"),
        attn_out="self_attn.dense",
        mlp_out="mlp.fc2",
        mlp_in="mlp.fc1",
        activation="gelu_tanh",
        lora_targets=("q_proj", "v_proj"),
    ),
    Family(
        name="gptj",
        model_types=("gptj",),
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        head="lm_head",
        embeddings=("transformer.wte", "transformer.rotary_emb"),
        attn_out="attn.out_proj",
        mlp_out="mlp.fc_out",
        mlp_in="mlp.fc_in",
        activation="gelu_tanh",
        lora_targets=("q_proj", "v_proj"),
    ),
    Family(
        name="falcon",
        model_types=("falcon",),
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        head="lm_head",
        embeddings=("transformer.word_embeddings", "transformer.rotary_emb"),
        attn_out="self_attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        mlp_in="mlp.dense_h_to_4h",
        activation="gelu",
        lora_targets=("query_key_value",),
    ),
    Family(  # StarCoder, SantaCoder: GPT-2's layout with nn.Linear and multi-query attention
        name="gpt_bigcode",
        model_types=("gpt_bigcode",),
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        head="lm_head",
        embeddings=("transformer.wte", "transformer.wpe"),
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        mlp_in="mlp.c_fc",
        activation="gelu_tanh",
        lora_targets=("c_attn",),
    ),
    Family(  # MPT: ALiBi positions, no biases
        name="mpt",
        model_types=("mpt",),
        blocks="transformer.blocks",
        final_norm="transformer.norm_f",
        head="lm_head",
        embeddings=("transformer.wte",),
        attn_out="attn.out_proj",
        mlp_out="ffn.down_proj",
        mlp_in="ffn.up_proj",
        activation="gelu",
        lora_targets=("Wqkv",),
    ),
    Family(
        name="codegen",
        model_types=("codegen",),
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        head="lm_head",
        embeddings=("transformer.wte", "transformer.rotary_emb"),
        attn_out="attn.out_proj",
        mlp_out="mlp.fc_out",
        mlp_in="mlp.fc_in",
        activation="gelu_tanh",
        lora_targets=("qkv_proj",),
    ),
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2",
                     "granite", "smollm3", "stablelm", "cohere", "starcoder2", "internlm2"),
        blocks="model.layers",
        final_norm="model.norm",
        head="lm_head",
        embeddings=("model.embed_tokens", "model.rotary_emb"),
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        activation="silu_gated",
        mlp_gated=("mlp.gate_proj", "mlp.up_proj"),
        lora_targets=("q_proj", "v_proj"),
    ),
)

# model types whose blocks cannot be dropped or run one by one, whatever their module paths say
UNSUPPORTED = dict.fromkeys(("gemma3n", "gemma3n_text"), "its blocks read per-layer input embeddings sized to the "
                            "full depth and share key/value caches across layers")

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_BY_NAME = {f.name: f for f in FAMILIES}


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    """Resolve a dotted attribute path; None when any step is missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, leaf, value)


def _generic_family(model: nn.Module, model_type: str) -> Family:
    """A Llama-like model of an unlisted type: accept it when the Llama paths resolve."""
    base = _BY_NAME["llama"]
    if isinstance(get_path(model, base.blocks), nn.ModuleList):
        if get_path(model, base.final_norm) is not None:
            return Family(**{**base.__dict__, "name": f"llama-like:{model_type}", "model_types": (model_type,)})
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported: its blocks are at '{base.blocks}' but it has no final norm "
            f"at '{base.final_norm}'; add a Family to offsite_ds/families.py")
    raise UnsupportedModelError(
        f"model type '{model_type}' is not supported: no block ModuleList at any known path "
        f"({', '.join(sorted({f.blocks for f in FAMILIES}))}); add a Family to offsite_ds/families.py"
    )


def family_of(model: nn.Module) -> Family:
    """The Family of an HF causal LM (checked against the live module tree, not just the config)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no HF config.model_type; pass a transformers model")
    if model_type in UNSUPPORTED:
        raise UnsupportedModelError(f"model type '{model_type}' is not supported: {UNSUPPORTED[model_type]}, so "
                                    "no emulator can be cut from it")
    family = _BY_TYPE.get(model_type)
    if family is None:
        return _generic_family(model, model_type)
    if not isinstance(get_path(model, family.blocks), nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model type '{model_type}') has no blocks at '{family.blocks}': "
            "load it with AutoModelForCausalLM, not a bare base model"
        )
    return family


def family_by_name(name: str) -> Family:
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.startswith("llama-like:"):
        return Family(**{**_BY_NAME["llama"].__dict__, "name": name, "model_types": (name.split(":", 1)[1],)})
    raise UnsupportedModelError(f"unknown family '{name}'; known: {', '.join(_BY_NAME)}")


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return get_path(model, family_of(model).blocks)


def depth_of(model: nn.Module) -> int:
    return len(blocks_of(model))


def block_prefix(family: Family, index: int) -> str:
    """State-dict name prefix of block `index`, e.g. 'model.decoder.layers.3.'."""
    return f"{family.blocks}.{index}."


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a family's forward does to `lm_head`'s output before the loss (None: nothing).

    Scoring from hidden states through the head in chunks must apply the same step the model's own
    forward applies: Gemma-2's final soft-capping, Cohere's logit scale, Granite's logit divisor.
    """
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return lambda logits: torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if getattr(config, "model_type", "") == "cohere" and scale is not None:
        return lambda logits: logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if getattr(config, "model_type", "") == "granite" and divisor:
        return lambda logits: logits / divisor
    return None


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the base model, whose output is the final-normed hidden state; the LM head) of a causal LM."""
    head = get_path(model, family_of(model).head)
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise UnsupportedModelError(f"{type(model).__name__} has no separate base model and '{family_of(model).head}'")
    return base, head


def is_transposed_linear(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer that stores its weight as [in, out] (LoRA's `fan_in_fan_out`)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def block_linears(block: nn.Module) -> dict[str, tuple[int, int]]:
    """Name -> (in, out) of every linear layer inside a block (nn.Linear and GPT-2's Conv1D)."""
    out = {}
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif is_transposed_linear(m):  # stores [in, out]
            out[name] = tuple(m.weight.shape)
    return out


def out_features(module: nn.Module) -> int:
    """Output width of a linear layer, whichever way round it stores its weight."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:
        return weight.shape[1] if is_transposed_linear(module) else weight.shape[0]
    raise UnsupportedModelError(f"{type(module).__name__} is not a linear layer")


def fan_in_fan_out(model: nn.Module) -> bool:
    """Whether the model's block linears store [in, out] weights (GPT-2), as PEFT's LoraConfig needs to know."""
    return any(is_transposed_linear(m) for m in blocks_of(model).modules())


def kv_floats_per_token(config) -> int:
    """Keys and values a decoder caches per token, over all its layers (grouped-query attention counted); HF's
    standard config names (GPT-2's n_layer, n_embd and n_head map onto them)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim


def supported_build(build: Callable[[], nn.Module]) -> tuple[nn.Module, Family]:
    """`build()` (a transformers constructor or loader) and the built model's Family, the one way a model is built
    before it is known to be supported. What transformers logs or warns while building is held until the family
    is known: an unsupported model (an encoder such as BERT) then fails with our one line alone, not after advice
    about its own classes; a supported model's messages are shown afterwards, as they would have been."""
    from transformers.utils import logging as hf_logging

    library = hf_logging.get_logger()  # the library's root logger: its children propagate to it and stop there
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers = library.handlers[:]
    library.handlers = [_Hold()]
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters still apply: only their output is held
            model = build()
            family = family_of(model)
    finally:
        library.handlers = handlers
    for record in held:  # only reached once the family is known
        library.handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return model, family
