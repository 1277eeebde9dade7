"""`plan`: exact parameter counts, model-state figures equal to DeepSpeed's own estimators, advice that fits."""
import pytest

from offsite_ds.manifests import LoraSettings
from offsite_ds.memory_plan import (KNOWN_MODELS, Setup, estimate, model_shape, model_state_bytes, plan,
                                    role_counts)
from offsite_ds.sandwich import Layout


def test_counts_match_the_real_model_and_deepspeeds_counter(tiny_model_dir):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    for family in ("opt", "bloom"):
        path = tiny_model_dir(family)
        shape = model_shape(str(path))
        total, largest = model_to_params(AutoModelForCausalLM.from_pretrained(path))
        assert (shape.total_params, shape.largest_layer_params) == (total, largest)


def test_known_models_have_their_published_sizes():
    assert model_shape("opt-6.7b").total_params == 6_658_473_984
    assert model_shape("bloom-7b1").total_params == 7_069_016_064
    assert model_shape("opt-1.3b").total_params == 1_315_758_080
    assert model_shape("gpt2-xl").total_params == 1_557_611_200
    assert set(KNOWN_MODELS) == {"opt-1.3b", "gpt2-xl", "opt-6.7b", "bloom-7b1"}


@pytest.mark.parametrize("model", ["opt-6.7b", "bloom-7b1", "gpt2-xl"])
@pytest.mark.parametrize("gpus,nodes", [(8, 1), (8, 4), (1, 1)])
def test_full_fine_tuning_model_states_equal_deepspeeds_estimators(model, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = model_shape(model)
    n, largest = shape.total_params, shape.largest_layer_params
    for opt, par in ((False, False), (True, False), (True, True)):
        ours = model_state_bytes(n, n, largest, Setup(gpus, nodes, 3, opt, par))
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(n, largest, gpus, nodes, cpu_offload=opt,
                                                             cpu_offload_params=par, zero_init=True)
        assert ours == (gpu, cpu)
    for opt in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(n, gpus, nodes, cpu_offload=opt)
        assert model_state_bytes(n, n, largest, Setup(gpus, nodes, 2, opt)) == (gpu, cpu)


def test_role_counts(tiny_model_dir):
    from offsite_ds.peft_modes import apply_mode
    from offsite_ds.tiny import tiny_model

    shape = model_shape(str(tiny_model_dir("opt")))
    layout = Layout.parse("2-2-2", 8)
    params, trainable, backward, no_grad = role_counts(shape, "distill", layout)
    assert trainable == 2 * shape.block_params and (backward, no_grad) == (4, 6)
    assert params == shape.outer_params + (6 + 4) * shape.block_params  # emulator + teacher middle
    assert role_counts(shape, "tune", layout)[1] == 4 * shape.block_params
    assert role_counts(shape, "ft", layout)[:2] == (shape.total_params, shape.total_params)
    model = tiny_model("opt", n_layers=8)
    apply_mode(model, list(range(8)), "lora", LoraSettings(r=4))
    real_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert role_counts(shape, "ft-lora", layout, lora_r=4)[1] == real_lora


def test_frozen_weights_cost_less_and_offload_moves_states_to_cpu():
    shape = model_shape("opt-6.7b")
    layout = Layout.parse("2-18-2", 32)
    base = Setup(8, 1, 3)
    ft, lora = estimate(shape, "ft", base, layout), estimate(shape, "ft-lora", base, layout)
    assert lora.gpu_model_states < ft.gpu_model_states / 5
    offloaded = estimate(shape, "ft", Setup(8, 1, 3, True, True), layout)
    assert offloaded.gpu_model_states < ft.gpu_model_states / 10 and offloaded.cpu_per_node > ft.cpu_per_node
    ckpt = estimate(shape, "ft", Setup(8, 1, 3, gradient_checkpointing=True), layout)
    assert ckpt.gpu_activations < ft.gpu_activations / 3


def test_plan_says_what_would_make_it_fit():
    result = plan("opt-6.7b", Setup(1, 1, 2), roles=("ft", "ft-lora"), gpu_gib=80)
    ft, lora = result["roles"]
    assert not ft["fits"] and "fits with ZeRO-3" in ft["suggestion"] and "offload" in ft["suggestion"]
    assert lora["fits"] and lora["suggestion"] is None
    tight = plan("bloom-7b1", Setup(8, 1, 3), roles=("ft",), gpu_gib=16, cpu_gib=64)["roles"][0]
    assert not tight["fits"] and "needs" in tight["suggestion"] and "nodes" in tight["suggestion"]


def test_cli_plan(tiny_model_dir, capsys):
    from offsite_ds.cli import main

    assert main(["plan", "bloom-7b1", "--gpus", "8", "--nodes", "2", "--zero", "3", "--offload"]) == 0
    out = capsys.readouterr().out
    assert "bloom-7b1" in out and "offload optimizer+params" in out and "distill" in out
    assert main(["plan", str(tiny_model_dir("opt") / "config.json"), "--gpus", "2", "--json"]) == 0
    assert '"roles"' in capsys.readouterr().out
    assert main(["plan", "opt-6.7b", "--gpus", "8", "--roles", "pretrain"]) == 2
    assert "unknown role 'pretrain'" in capsys.readouterr().err
    assert main(["plan", "no-such-model", "--gpus", "8"]) == 2
    assert main(["plan", "opt-6.7b", "--gpus", "8", "--zero", "1", "--offload"]) == 2
