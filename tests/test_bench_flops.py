"""The benchmark's FLOP count: hand-computed examples, and agreement with torch's own FLOP counter."""
import pytest
import torch

from offsite_ds.bench.flops import BlockCost, FlopPlan, flops_per_token, plan_from_model
from offsite_ds.errors import OffsiteError


def _block(trainable: bool) -> BlockCost:
    # 120 matmul entries per block, 36 of them the attention input projections; norms trainable with the block
    return BlockCost(base=120, base_trainable=120 if trainable else 0, input_proj=36, other_trainable=trainable)


def test_ot_full_adapter_by_hand():
    # blocks 0 and 3 trainable (the adapter), 1 and 2 frozen (the emulator's middle); head frozen.
    plan = FlopPlan([_block(True), _block(False), _block(False), _block(True)], attn_width=8, head=50,
                    head_trainable=False, upstream_trainable=False)
    out = flops_per_token(plan, seq_len=7)
    attn = 4 * 8 * (7 + 1) / 2  # 128 forward per token per block, causal average context 4
    assert out["trainable_blocks"] == 2 * (6 * 120 + 3 * attn)  # 2 x 1104
    assert out["crossed_blocks"] == 2 * (4 * 120 + 3 * attn)  # 2 x 864
    assert out["forward_only_blocks"] == 0
    assert out["head"] == 4 * 50  # forward + input gradient, no weight gradient
    assert out["total"] == 4136
    assert (out["n_trainable_blocks"], out["n_crossed_blocks"]) == (2, 2)


def test_lora_block_and_forward_only_blocks_by_hand():
    lora_block = BlockCost(base=120, base_trainable=0, input_proj=36, lora=10, lora_input=4)
    plan = FlopPlan([_block(False), lora_block, _block(False), _block(False)], attn_width=8, head=50,
                    head_trainable=False, upstream_trainable=False)
    out = flops_per_token(plan, seq_len=7)
    assert out["forward_only_blocks"] == 2 * 120 + 128  # below every trainable parameter: forward only
    # forward 260, input gradients 260 minus the q/k/v + LoRA-A inputs nothing needs (2 x 40), LoRA weight grads 20
    assert out["trainable_blocks"] == 260 + 180 + 20 + 3 * 128
    assert out["crossed_blocks"] == 2 * 864
    assert out["total"] == 368 + 844 + 1728 + 200


def test_rules_of_thumb_without_attention():
    # the figures: trainable 6N, crossed 4N, forward only 2N (attention width 0 removes the rest)
    frozen = BlockCost(base=100, base_trainable=0, input_proj=0)
    full = BlockCost(base=100, base_trainable=100, input_proj=0, other_trainable=True)
    plan = FlopPlan([frozen, full, frozen], attn_width=0, head=0, head_trainable=False, upstream_trainable=False)
    out = flops_per_token(plan, seq_len=16)
    assert (out["forward_only_blocks"], out["trainable_blocks"], out["crossed_blocks"]) == (200, 600, 400)


def test_full_finetuning_and_causal_switch():
    blocks = [_block(True) for _ in range(4)]
    plan = FlopPlan(blocks, attn_width=8, head=50, head_trainable=True, upstream_trainable=True)
    assert flops_per_token(plan, 7)["total"] == 4 * (720 + 384) + 6 * 50
    assert flops_per_token(plan, 7, causal=False)["total"] == 4 * (720 + 3 * 4 * 8 * 7) + 6 * 50


def test_nothing_trainable_is_refused():
    plan = FlopPlan([_block(False)], attn_width=8, head=50, head_trainable=False, upstream_trainable=False)
    with pytest.raises(OffsiteError, match="nothing is trainable"):
        flops_per_token(plan, 8)


def test_plan_reads_a_real_block():
    from offsite_ds.tiny import tiny_model

    model = tiny_model("opt", n_layers=2)  # hidden 32, ffn 128
    plan = plan_from_model(model)
    assert [b.base for b in plan.blocks] == [12 * 32 * 32] * 2  # q, k, v, out + fc1, fc2
    assert plan.blocks[0].input_proj == 3 * 32 * 32
    assert plan.head == 258 * 32 and plan.attn_width == 32


def _trained(family: str, setting: str):
    from transformers import AutoModelForCausalLM

    from offsite_ds.emulator import build_emulator
    from offsite_ds.peft_modes import apply_mode
    from offsite_ds.sandwich import Layout
    from offsite_ds.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config(family, n_layers=6)
    config._attn_implementation = "eager"  # plain matmuls, so torch's counter sees the attention products
    model = AutoModelForCausalLM.from_config(config)
    positions = list(range(6))
    if setting.startswith("ot"):
        layout = Layout.parse("1-2-1", 6)
        model, _ = build_emulator(model, layout)
        positions = layout.adapter_positions
    if setting == "ft":
        model.requires_grad_(True)
    else:
        apply_mode(model, positions, "lora" if setting.endswith("lora") else "full")
    return model


@pytest.mark.parametrize("family", ["opt", "gpt2"])
@pytest.mark.parametrize("setting,tolerance", [("ft", 0.0), ("ot", 0.0), ("ft-lora", 0.005), ("ot-lora", 0.005)])
def test_count_matches_torch_flop_counter(family, setting, tolerance):
    """What autograd really executes (torch.utils.flop_counter) equals the analytic count; the only gap is
    separate-q/v LoRA's skipped dK in eager attention (fused SDPA kernels compute it anyway)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _trained(family, setting)
    batch, seq = 2, 12
    ids = torch.randint(0, 258, (batch, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    measured = counter.get_total_flops()
    counted = flops_per_token(plan_from_model(model), seq, causal=False)["total"] * batch * seq
    assert counted >= measured  # never less than what runs: no hidden work is left out
    assert counted <= measured * (1 + tolerance)
