"""An honest FLOP count for training a partly frozen transformer, per token.

Only matrix multiplies are counted (norms, activations, softmax and the embedding lookup are noise).
For a weight matrix with n entries, a token costs 2n FLOPs forward, 2n more for the gradient with respect
to its input (only where a gradient must flow through it) and 2n more for the weight gradient (only if it
is trainable). Hence, per block of N matmul weights:

- trainable block: ~6N;
- frozen block that gradients must cross (something trainable lies nearer the input): ~4N;
- frozen block that every trainable parameter lies beyond (nearer the loss): 2N, forward only. The issue
  text calls these "above every trainable one"; in data-flow order they come before them. Example: in OT
  the bottom adapter is trainable, so every emulator block is crossed; with nothing trainable below, the
  embeddings are forward only.
- LoRA: frozen base 4N plus 6 times the LoRA matrices.

Two refinements keep the count from flattering MFU. When the lowest block holding trainable parameters
trains LoRA only (its pre-attention norm frozen) and nothing below it trains, the input gradient of its
attention input projections (q/k/v and the LoRA-A beside them) is not needed; autograd skips it, so it
is not counted. (With the whole block trainable, its input norm's weight gradient needs it, so it is.)
Attention's score and value products cost 4 * width * context per token forward and twice that
backward, with context the causal average (s+1)/2 (what is needed, not the full s*s that a kernel may
compute; `causal=False` gives the PaLM-style full count). Matmuls outside the blocks other than the head (OPT-350m's
project_in/out) are counted as forward only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from offsite_ds.errors import OffsiteError
from offsite_ds.families import family_of, get_path
from offsite_ds.zero3 import full_numel


@dataclass
class BlockCost:
    """The matmul weights of one block, split by what training needs from them."""

    base: int  # frozen or trainable base matmul weights (entries)
    base_trainable: int  # of which trainable
    input_proj: int  # base weights of the attention input projections (read the block's input)
    lora: int = 0  # LoRA matrices (trainable)
    lora_input: int = 0  # LoRA-A matrices of the input projections (read the block's input)
    other_trainable: bool = False  # trainable non-LoRA parameters besides matrices (norms, biases)

    @property
    def trainable(self) -> bool:
        return self.base_trainable > 0 or self.lora > 0 or self.other_trainable

    @property
    def only_lora_trainable(self) -> bool:
        """Then the pre-attention norm is frozen and nothing needs the gradient at the q/k/v inputs."""
        return self.lora > 0 and self.base_trainable == 0 and not self.other_trainable


@dataclass
class FlopPlan:
    """What the FLOP count needs to know about a model being trained, read off the live module tree."""

    blocks: list[BlockCost]
    attn_width: int  # query width: heads * head_dim
    head: int  # entries of the LM head matrix (hidden x vocab)
    head_trainable: bool
    upstream_trainable: bool  # anything trainable before block 0 (embeddings): gradients reach block 0's input
    other: int = 0  # other matmul weights outside the blocks (forward only)


def _is_lora(name: str) -> bool:
    return ".lora_" in f".{name}"


def block_cost(block: nn.Module, attn_prefix: str, attn_out: str) -> BlockCost:
    """Classify one block's matrices (2-D parameters): base or LoRA, trainable or not, input projection or not."""
    cost = BlockCost(base=0, base_trainable=0, input_proj=0)
    for name, p in block.named_parameters():
        if p.dim() < 2:
            cost.other_trainable = cost.other_trainable or (p.requires_grad and not _is_lora(name))
            continue
        n = full_numel(p)  # ZeRO-3 partitions look empty
        in_proj = name.startswith(attn_prefix + ".") and not name.startswith(attn_out + ".")
        if _is_lora(name):
            cost.lora += n
            if in_proj and ".lora_A." in name:
                cost.lora_input += n
        else:
            cost.base += n
            cost.base_trainable += n if p.requires_grad else 0
            cost.input_proj += n if in_proj else 0
    return cost


def plan_from_model(model: nn.Module) -> FlopPlan:
    """Read a FlopPlan off `model` (works on meta-device and ZeRO-3-partitioned models too)."""
    family = family_of(model)
    blocks = get_path(model, family.blocks)
    attn_prefix = family.attn_out.rpartition(".")[0]
    costs = [block_cost(b, attn_prefix, family.attn_out) for b in blocks]
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    head_module = get_path(model, family.head)
    head_weight = head_module.weight
    head_n = full_numel(head_weight)
    upstream, other = False, 0
    for path in family.embeddings:
        module = get_path(model, path)
        if module is None:
            continue
        upstream = upstream or any(p.requires_grad for p in module.parameters())
        if isinstance(module, nn.Linear) and module.weight is not head_weight:
            other += full_numel(module.weight)
    return FlopPlan(costs, heads * head_dim, head_n, bool(head_weight.requires_grad), upstream, other)


def flops_per_token(plan: FlopPlan, seq_len: int, causal: bool = True) -> dict:
    """Training FLOPs per token (forward + backward + weight gradients), with a breakdown by kind."""
    trainable = [i for i, b in enumerate(plan.blocks) if b.trainable]
    if not trainable and not plan.head_trainable and not plan.upstream_trainable:
        raise OffsiteError("nothing is trainable in this model; there is no training step to count")
    lowest = -1 if plan.upstream_trainable else (trainable[0] if trainable else len(plan.blocks))
    context = (seq_len + 1) / 2 if causal else seq_len
    attn = 4 * plan.attn_width * context  # QK^T and AV, forward, per token per block
    out = {"trainable_blocks": 0.0, "crossed_blocks": 0.0, "forward_only_blocks": 0.0, "head": 0.0,
           "other": 2.0 * plan.other, "attention": 0.0,
           "n_trainable_blocks": 0, "n_crossed_blocks": 0, "n_forward_only_blocks": 0}
    for i, b in enumerate(plan.blocks):
        forward = 2 * (b.base + b.lora)
        if i < lowest:
            out["forward_only_blocks"] += forward + attn
            out["attention"] += attn
            out["n_forward_only_blocks"] += 1
            continue
        grad_at_input = i > lowest or plan.upstream_trainable
        input_grads = 2 * (b.base + b.lora)
        if not grad_at_input and b.only_lora_trainable:
            input_grads -= 2 * (b.input_proj + b.lora_input)
        weight_grads = 2 * (b.base_trainable + b.lora)
        cost = forward + input_grads + weight_grads + 3 * attn
        out["attention"] += 3 * attn
        kind = "trainable" if b.trainable else "crossed"
        out[f"{kind}_blocks"] += cost
        out[f"n_{kind}_blocks"] += 1
    gradient_below_head = lowest < len(plan.blocks)
    out["head"] = 2 * plan.head * (1 + int(gradient_below_head) + int(plan.head_trainable))
    out["total"] = (out["trainable_blocks"] + out["crossed_blocks"] + out["forward_only_blocks"]
                    + out["head"] + out["other"])
    out["attention_context"] = "causal (s+1)/2" if causal else "full s"
    return out
