"""Families beyond the four every other test runs on (GPT-NeoX/Pythia, Phi, GPT-J, Falcon, GPT-BigCode, MPT,
CodeGen): the default recipe end
to end on tiny random models; the checkpoint renames transformers applies on load are followed; layouts it converts
on load (one tensor per MoE expert) are refused in one line."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from offsite_ds.adapter_package import load_adapter_package
from offsite_ds.emulator import make_bundle
from offsite_ds.families import blocks_of, family_of
from offsite_ds.fitting import FitSettings
from offsite_ds.plugin import load_model_dir, plugin
from offsite_ds.roles.tune_adapter import tune
from offsite_ds.tiny import byte_tokenizer, save_tiny_model
from offsite_ds.train import TrainConfig

MORE_FAMILIES = ("gpt_neox", "phi", "gptj", "falcon", "gpt_bigcode", "mpt", "codegen")


@pytest.fixture
def public_text(tmp_path):
    path = tmp_path / "public.txt"
    path.write_text(" ".join(f"word{i % 37} and item {i % 11} ." for i in range(800)))
    return path


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_the_default_recipe_on_more_families(family, public_text, corpus_file, tmp_path):
    """emulate's default builder (importance scored block by block from the shards, the block fit, the KL phase),
    tune, plug in: the bundle and the plug-in load in plain transformers, the fit lowered every block's error, and
    the plug-in changes exactly the adapter blocks' tensors."""
    model_dir = save_tiny_model(family, tmp_path / "model", n_layers=8)
    fit = FitSettings(tokens=1024, epochs=2, lr=1e-3, seq_len=64, kl_epochs=1)
    written = make_bundle(model_dir, "2-2-2", tmp_path / "bundle", calib_data=public_text, calib_tokens=256,
                          fit=fit, log=lambda _line: None)
    record = written.manifest.compression.fit
    assert written.manifest.compression.select == "importance" and len(record.blocks) == 2
    assert all(b.after < b.before for b in record.blocks if b.before > 0), record.blocks
    emulator = AutoModelForCausalLM.from_pretrained(written.path)
    assert len(blocks_of(emulator)) == 6 and torch.isfinite(emulator(torch.tensor([[5, 6, 7]])).logits).all()

    tune(written.path, corpus_file, tmp_path / "adapter", mode="full", seq_len=32,
         cfg=TrainConfig(steps=3, lr=5e-3, batch_size=2, progress=False))
    names = set(load_adapter_package(tmp_path / "adapter").tensors)
    plugged = AutoModelForCausalLM.from_pretrained(plugin(model_dir, tmp_path / "adapter", tmp_path / "plugged"))
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    plugged_sd, full_sd = plugged.state_dict(), full.state_dict()
    assert {n for n in full_sd if not torch.equal(full_sd[n], plugged_sd[n])} == names
    blocks = family_of(full).blocks + "."
    assert {int(n[len(blocks):].split(".")[0]) for n in names} == {0, 1, 6, 7}

    ids = torch.tensor([[5, 6, 7, 8]])
    for mode in ("lora", "adapter"):  # the family's LoRA targets and Houlsby positions resolve; BitFit: test_ds_roles
        tune(written.path, corpus_file, tmp_path / mode, mode=mode, seq_len=32,
             cfg=TrainConfig(steps=2, lr=5e-3, batch_size=2, progress=False))
        model, _ = load_model_dir(plugin(model_dir, tmp_path / mode, tmp_path / f"{mode}-plugged"))
        assert not torch.allclose(model(ids).logits, full(ids).logits), mode


def test_a_renamed_head_is_read_as_transformers_reads_it(tmp_path):
    """GPT-NeoX checkpoints name the head `embed_out` (Pythia's on the Hub, and transformers' own save_pretrained,
    which renames `lm_head` back on save): the streamed reader follows transformers' rename, and the bundle and
    the plug-in hold the head as the model names it. A checkpoint saved under the new name reads the same."""
    from offsite_ds.shards import ModelCheckpoint

    model_dir = save_tiny_model("gpt_neox", tmp_path / "model", n_layers=4)
    weights = load_file(model_dir / "model.safetensors")
    assert "embed_out.weight" in weights and "lm_head.weight" not in weights
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    checkpoint = ModelCheckpoint(model_dir)
    assert checkpoint.source("lm_head.weight") == "embed_out.weight" and not checkpoint.unused
    bundle = make_bundle(model_dir, "1-1-1", tmp_path / "bundle", select="uniform", calib_data=None).path
    assert torch.equal(AutoModelForCausalLM.from_pretrained(bundle).lm_head.weight, full.lm_head.weight)

    weights["lm_head.weight"] = weights.pop("embed_out.weight")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert ModelCheckpoint(model_dir).source("lm_head.weight") == "lm_head.weight"


def test_a_layout_transformers_converts_on_load_is_refused_in_one_line(tmp_path, capsys):
    """A checkpoint that keeps one tensor per MoE expert (transformers stacks them on load) cannot be read tensor
    by tensor: `emulate` says so in one line, exit 2, and writes nothing."""
    from offsite_ds.cli import main

    config = AutoConfig.for_model("mixtral", vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                  num_experts_per_tok=1, pad_token_id=257, bos_token_id=256, eos_token_id=256)
    model_dir = tmp_path / "moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    assert main(["emulate", str(model_dir), "--layout", "1-1-1", "--select", "uniform", "--no-calib",
                 "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "converts on load" in err and "'mixtral' models are not supported" in err
    assert not (tmp_path / "bundle").exists()


def test_a_model_whose_blocks_cannot_run_alone_is_refused_by_name():
    """Gemma-3n's blocks read per-layer embeddings sized to the full depth: refused by model type, in one line,
    before anything is cut (its module paths alone would pass for a Llama)."""
    from offsite_ds.errors import UnsupportedModelError

    config = AutoConfig.for_model("gemma3n_text", vocab_size=258, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  num_kv_shared_layers=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="'gemma3n_text' is not supported: its blocks read per-layer"):
        family_of(model)
