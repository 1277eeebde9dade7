"""Attention through torch SDPA, or flash-attn when it is importable: chosen per model, undoable.

Models whose HF class supports it switch with `set_attn_implementation` ("flash_attention_2" when
flash-attn imports and the model is on CUDA, else "sdpa"). BLOOM's HF attention is eager only (ALiBi
added to materialised scores, fp32 softmax, probabilities kept for backward); its attention modules get a
forward that runs SDPA with the ALiBi + mask bias, or flash-attn with `alibi_slopes` when there is no
padding and no KV cache. flash-attn's bias is -slope*|i-j|, BLOOM's slope*j: under a causal mask they
differ by slope*i per query row, which softmax ignores, so both give the same attention. Without
flash-attn an unpadded batch gets one [1, heads, q, kv] bias (SDPA broadcasts it), not B of them.

A model patched before it reaches the GPU (often: `patch` runs on the loaded CPU model) gets a one-shot
forward pre-hook that switches it to flash_attention_2 at its first forward on CUDA.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

_FLASH_UNSET = object()
_flash_func = _FLASH_UNSET


def flash_attn_func():
    """flash-attn's `flash_attn_func`, or None when the package is absent or broken."""
    global _flash_func
    if _flash_func is _FLASH_UNSET:
        try:
            from flash_attn import flash_attn_func as func
        except Exception:  # noqa: BLE001 - a missing or ABI-mismatched build both mean "not available"
            func = None
        _flash_func = func
    return _flash_func


def flash_can_run(q: torch.Tensor) -> bool:
    """flash-attn runs fp16/bf16 CUDA tensors with head_dim <= 256."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def choose_attention(model: nn.Module) -> str:
    """The implementation HF should use for `model`: flash_attention_2, sdpa, or what it has now."""
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    on_cuda = _model_device(model).type == "cuda"
    if flash_attn_func() is not None and on_cuda and getattr(model, "_supports_flash_attn", False):
        return "flash_attention_2"
    if getattr(model, "_supports_sdpa", False):
        return "sdpa"
    return current


def _bloom_attention_types() -> tuple[type, ...]:
    try:
        from transformers.models.bloom.modeling_bloom import BloomAttention
    except ImportError:  # pragma: no cover - transformers without BLOOM
        return ()
    return (BloomAttention,)


def _alibi_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    """BloomAttention.forward through SDPA / flash-attn (same inputs and outputs; no attention probs)."""
    if output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact):
        return self._offsite_eager_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                           use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch, q_len, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [B, heads, len, head_dim]
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    dropout = self.attention_dropout.p if self.training else 0.0
    flash = flash_attn_func()
    # flash only without past tokens (a fresh cache is fine: training forwards often carry an empty one)
    if (flash is not None and key.shape[2] == q_len and self._offsite_state.get("no_padding", False)
            and flash_can_run(query)):
        if self._offsite_slopes is None or self._offsite_slopes.device != query.device:
            from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

            self._offsite_slopes = _get_alibi_slopes(self.num_heads, query.device).float()
        context = flash(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout,
                        softmax_scale=self.inv_norm_factor, causal=True, alibi_slopes=self._offsite_slopes)
        context = context.reshape(batch, q_len, self.hidden_size)
    else:
        kv_len = key.shape[2]
        bias = alibi.view(batch, self.num_heads, -1, kv_len).to(query.dtype) * self.beta
        if self._offsite_state.get("no_padding", False):
            # every row of the batch has the same ALiBi and causal mask: a [1, heads, q, kv] bias that SDPA
            # broadcasts, not a B x heads x q x kv one
            bias = bias[:1]
            attention_mask = None if attention_mask is None else attention_mask[:1]
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill_(
                    ~attention_mask, torch.finfo(query.dtype).min)
            bias = bias + attention_mask.to(query.dtype)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                 scale=self.inv_norm_factor)
        context = context.transpose(1, 2).reshape(batch, q_len, self.hidden_size)
    output = self.dense(context)
    output = residual + F.dropout(output, p=self.hidden_dropout, training=self.training)
    return output, None


def _padding_hook(state: dict):
    """Forward pre-hook on the base model: remember whether this batch has padding (one host sync)."""
    def hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        state["no_padding"] = mask is None or (mask.dim() == 2 and bool(mask.all()))
    return hook


@dataclass
class AttentionPatch:
    """What `use_fast_attention` changed, so that `undo` can put it back."""

    model: nn.Module
    previous: str | None
    chosen: str
    patched_modules: list[nn.Module] = field(default_factory=list)
    hooks: list = field(default_factory=list)

    def undo(self) -> None:
        for module in self.patched_modules:
            module.__dict__.pop("forward", None)
            for name in ("_offsite_eager_forward", "_offsite_state", "_offsite_slopes"):
                module.__dict__.pop(name, None)
        for hook in self.hooks:
            hook.remove()
        if self.previous is not None and self.chosen != self.previous:
            self.model.set_attn_implementation(self.previous)
        self.patched_modules.clear()
        self.hooks.clear()


def use_fast_attention(model: nn.Module) -> AttentionPatch:
    """Route `model`'s attention through SDPA or flash-attn; returns the patch (call `.undo()` to revert)."""
    previous = getattr(model.config, "_attn_implementation", None)
    chosen = choose_attention(model)
    if chosen != previous and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(chosen)
        except (ValueError, ImportError):
            chosen = previous or "eager"
    patch = AttentionPatch(model=model, previous=previous, chosen=chosen)
    alibi_types = _bloom_attention_types()
    state: dict = {"no_padding": False}
    for module in model.modules():
        if alibi_types and isinstance(module, alibi_types) and "forward" not in module.__dict__:
            module._offsite_eager_forward = module.forward
            module._offsite_state = state
            module._offsite_slopes = None
            module.forward = types.MethodType(_alibi_forward, module)
            patch.patched_modules.append(module)
    if patch.patched_modules:
        patch.chosen = "flash_attn(alibi) or sdpa(alibi)" if flash_attn_func() is not None else "sdpa(alibi)"
        # flash-attn and the batch-shared ALiBi bias both need to know whether the batch is padded
        base = getattr(model, "base_model", model)
        patch.hooks.append(base.register_forward_pre_hook(_padding_hook(state), with_kwargs=True))
    elif chosen != "flash_attention_2" and _flash_later(model):
        hook, handle = _choose_flash_on_cuda(patch)
        handle.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        patch.hooks.append(handle[0])
    return patch


def _flash_later(model: nn.Module) -> bool:
    """flash-attn would be chosen but the model is not on CUDA yet (patched before being moved there)."""
    return (flash_attn_func() is not None and torch.cuda.is_available() and _model_device(model).type != "cuda"
            and getattr(model, "_supports_flash_attn", False))


def _choose_flash_on_cuda(patch: AttentionPatch):
    """Forward pre-hook: at the first forward on CUDA, switch to flash_attention_2 (then remove itself)."""
    def hook(module, args, kwargs):
        if _model_device(module).type != "cuda":
            return
        try:
            module.set_attn_implementation("flash_attention_2")
            patch.chosen = "flash_attention_2"
        except (ValueError, ImportError):
            pass
        patch.hooks.remove(handle[0])
        handle[0].remove()
    handle: list = []
    return hook, handle


__all__ = ["AttentionPatch", "choose_attention", "flash_attn_func", "flash_can_run", "use_fast_attention"]
