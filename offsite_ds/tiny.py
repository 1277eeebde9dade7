"""Tiny, randomly initialised models of the real architectures, with a byte-level tokenizer.

They let tests, the CPU benchmark smoke mode and try-outs exercise the real HF classes (OPT, BLOOM,
GPT-2, Llama; GPT-NeoX, Phi, GPT-J, Falcon, GPT-BigCode, MPT, CodeGen) without any download. Shapes are the real configs' shapes shrunk, nothing else changed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast)

TINY_FAMILIES = ("opt", "bloom", "gpt2", "llama", "gpt_neox", "phi", "gptj", "falcon", "gpt_bigcode", "mpt", "codegen")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <eos>/<pad>, no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>",
                                   pad_token="<pad>", unk_token=None)


def tiny_config(family: str, n_layers: int = 6, hidden: int = 32, vocab: int = 258,
                max_positions: int = 128) -> PretrainedConfig:
    """Config of the real architecture `family` at toy size."""
    heads = 4
    if family == "opt":
        return AutoConfig.for_model("opt", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers,
                                    ffn_dim=hidden * 4, num_attention_heads=heads, word_embed_proj_dim=hidden,
                                    max_position_embeddings=max_positions, pad_token_id=vocab - 1,
                                    bos_token_id=vocab - 2, eos_token_id=vocab - 2, dropout=0.0,
                                    attention_dropout=0.0, tie_word_embeddings=True)
    if family == "bloom":
        return AutoConfig.for_model("bloom", vocab_size=vocab, hidden_size=hidden, n_layer=n_layers, n_head=heads,
                                    pad_token_id=vocab - 1, bos_token_id=vocab - 2, eos_token_id=vocab - 2,
                                    hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=hidden, n_layer=n_layers, n_head=heads,
                                    n_positions=max_positions, bos_token_id=vocab - 2, eos_token_id=vocab - 2,
                                    pad_token_id=vocab - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    tie_word_embeddings=True)
    if family == "llama":
        return AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                                    num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=2,
                                    max_position_embeddings=max_positions, pad_token_id=vocab - 1,
                                    bos_token_id=vocab - 2, eos_token_id=vocab - 2, tie_word_embeddings=True)
    common = dict(vocab_size=vocab, pad_token_id=vocab - 1, bos_token_id=vocab - 2, eos_token_id=vocab - 2,
                  tie_word_embeddings=False)
    if family in ("gpt_neox", "phi"):
        return AutoConfig.for_model(family, hidden_size=hidden, intermediate_size=hidden * 4,
                                    num_hidden_layers=n_layers, num_attention_heads=heads,
                                    max_position_embeddings=max_positions, **common)
    if family == "gptj":
        return AutoConfig.for_model("gptj", n_embd=hidden, n_layer=n_layers, n_head=heads, rotary_dim=hidden // heads,
                                    n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    **common)
    if family == "falcon":  # the 7B shape: multi-query attention, parallel attention and MLP
        return AutoConfig.for_model("falcon", hidden_size=hidden, num_hidden_layers=n_layers,
                                    num_attention_heads=heads, multi_query=True, parallel_attn=True, **common)
    if family in ("gpt_bigcode", "codegen"):
        extra = {"rotary_dim": hidden // heads} if family == "codegen" else {}
        return AutoConfig.for_model(family, n_embd=hidden, n_layer=n_layers, n_head=heads, n_positions=max_positions,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra, **common)
    if family == "mpt":
        return AutoConfig.for_model("mpt", d_model=hidden, n_layers=n_layers, n_heads=heads,
                                    max_seq_len=max_positions, **common)
    raise ValueError(f"no tiny config for family '{family}'; choose one of {', '.join(TINY_FAMILIES)}")


def tiny_model(family: str, n_layers: int = 6, seed: int = 0, **kw) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers=n_layers, **kw))
    return model.eval()


def save_tiny_model(family: str, out_dir: str | Path, n_layers: int = 6, seed: int = 0, **kw) -> Path:
    """Write a loadable HF model directory (config, safetensors, tokenizer) of a tiny random model."""
    out = Path(out_dir)
    model = tiny_model(family, n_layers=n_layers, seed=seed, **kw)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out
