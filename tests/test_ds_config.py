"""DeepSpeed configs: every stock config fills completely from the run's settings, and disagreements are refused."""
import json

import pytest

from offsite_ds import ds_config
from offsite_ds.ds_config import CONFIG_DIR, STOCK_CONFIGS, is_zero3, load_ds_config, offload_devices, zero_stage
from offsite_ds.errors import OffsiteError
from offsite_ds.runtime import bf16_wanted
from offsite_ds.tiny import tiny_config
from offsite_ds.train import TrainConfig


def build_ds_config(source, cfg, model_config=None, world=1):
    """The filler with bf16 decided as the Runtime decides it on this (CPU) machine."""
    return ds_config.build_ds_config(source, cfg, model_config, world=world, bf16=bf16_wanted(cfg.precision, "cpu"))


def _cfg(**kw):
    return TrainConfig(**{"batch_size": 3, "grad_accum": 5, "lr": 2e-4, "weight_decay": 0.1, "max_grad_norm": 0.5,
                          "precision": "auto", **kw})


@pytest.mark.parametrize("name", STOCK_CONFIGS)
def test_stock_config_fills_every_auto(name):
    model_config = tiny_config("opt", hidden=64)
    config = build_ds_config(name, _cfg(), model_config=model_config, world=4)
    assert "auto" not in json.dumps(config)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False  # CPU: bf16 only when asked
    assert config["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    zero = config["zero_optimization"]
    if "reduce_bucket_size" in zero:
        assert zero["reduce_bucket_size"] == 64 * 64
    if is_zero3(config):
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        assert zero["stage3_param_persistence_threshold"] == 10 * 64
    # DeepSpeed's own config class accepts the result (no process group here: it counts one rank)
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(build_ds_config(name, _cfg(), model_config=model_config, world=1))
    assert parsed.train_batch_size == 15 and parsed.zero_optimization_stage == zero_stage(config)


def test_stock_configs_say_what_they_are():
    assert zero_stage(load_ds_config("zero3")) == 3 and offload_devices(load_ds_config("zero3")) == (False, False)
    assert offload_devices(load_ds_config("zero3_offload")) == (True, True)
    assert zero_stage(load_ds_config("zero2")) == 2
    assert zero_stage(load_ds_config(CONFIG_DIR / "single_gpu.json")) == 0


def test_filling_is_idempotent_and_leaves_the_source_alone():
    source = load_ds_config("zero3")
    once = build_ds_config(source, _cfg(), model_config=tiny_config("bloom"), world=2)
    twice = build_ds_config(once, _cfg(), model_config=tiny_config("bloom"), world=2)
    assert once == twice
    assert source["train_micro_batch_size_per_gpu"] == "auto"


def test_bf16_follows_precision():
    assert build_ds_config("zero2", _cfg(precision="bf16"), tiny_config("opt"), world=1)["bf16"]["enabled"] is True
    assert build_ds_config("zero2", _cfg(precision="fp32"), tiny_config("opt"), world=1)["bf16"]["enabled"] is False


def test_a_concrete_value_that_disagrees_is_refused():
    config = load_ds_config("zero3")
    config["train_micro_batch_size_per_gpu"] = 16
    config["optimizer"]["params"]["lr"] = 1e-3
    with pytest.raises(OffsiteError, match=r"train_micro_batch_size_per_gpu=16 but --batch-size gives 3.*lr"):
        build_ds_config(config, _cfg(), tiny_config("opt"), world=1)
    config = load_ds_config("zero3")
    config["bf16"]["enabled"] = True
    with pytest.raises(OffsiteError, match="bf16.enabled"):
        build_ds_config(config, _cfg(precision="fp32"), tiny_config("opt"), world=1)


def test_torch_adam_switch_and_scheduler_section():
    config = load_ds_config("zero3")
    config["scheduler"] = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto"}}
    filled = build_ds_config(config, _cfg(torch_adam=True), tiny_config("opt"), world=1)
    assert filled["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in filled  # the loop's warm-up + cosine is the one schedule
    assert "torch_adam" not in build_ds_config("zero3", _cfg(), tiny_config("opt"), world=1)["optimizer"]["params"]


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["fp16"].update(enabled=True), "fp16 is not supported"),
    (lambda c: c["zero_optimization"].update(stage=5), "stage 5"),
    (lambda c: c["zero_optimization"].update(stage=1, offload_optimizer={"device": "cpu"}), "offload needs ZeRO stage"),
    (lambda c: c["zero_optimization"].update(stage=2, offload_param={"device": "cpu"}), "needs ZeRO stage 3"),
])
def test_impossible_configs_are_refused(edit, message):
    config = load_ds_config("zero3")
    config["fp16"] = {"enabled": False}
    edit(config)
    with pytest.raises(OffsiteError, match=message):
        build_ds_config(config, _cfg(), tiny_config("opt"), world=1)


def test_unknown_config_and_unknown_hidden_size(tmp_path):
    with pytest.raises(OffsiteError, match="not found.*zero3"):
        load_ds_config("zero4")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(OffsiteError, match="not valid JSON"):
        load_ds_config(bad)
    with pytest.raises(OffsiteError, match="hidden size is unknown"):
        build_ds_config("zero3", _cfg(), model_config=None, world=1)
