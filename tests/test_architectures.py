"""Families beyond the four every other test runs on (GPT-NeoX/Pythia, Phi, GPT-J, Falcon, GPT-BigCode, MPT,
CodeGen) and MoE checkpoints (Mixtral, Qwen-MoE): the default recipe end to end on tiny random models, the checkpoint
renames and layout conversions transformers applies on load followed; Gemma-3n refused in one line."""
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
from offsite_ds.tiny import byte_tokenizer, save_tiny_model, tiny_config
from offsite_ds.train import TrainConfig

MORE_FAMILIES = ("gpt_neox", "phi", "gptj", "falcon", "gpt_bigcode", "mpt", "codegen")


@pytest.fixture
def public_text(tmp_path):
    path = tmp_path / "public.txt"
    path.write_text(" ".join(f"word{i % 37} and item {i % 11} ." for i in range(800)))
    return path


def _default_round_trip(model_dir, layout, public_text, corpus_file, tmp_path, steps=2):
    """emulate's default builder at toy budgets (importance, the block fit, the KL phase), a full-mode tune and the
    plug-in: (the written bundle, the package's tensor names, the full model, the names the plug-in changed)."""
    fit = FitSettings(tokens=1024, epochs=2, lr=1e-3, seq_len=64, kl_epochs=1)
    written = make_bundle(model_dir, layout, tmp_path / "bundle", calib_data=public_text, calib_tokens=256, fit=fit,
                          log=lambda _line: None)
    emulator = AutoModelForCausalLM.from_pretrained(written.path)  # plain transformers loads the bundle
    assert len(blocks_of(emulator)) == len(written.manifest.block_map)
    assert torch.isfinite(emulator(torch.tensor([[5, 6, 7]])).logits).all()
    tune(written.path, corpus_file, tmp_path / "adapter", mode="full", seq_len=32,
         cfg=TrainConfig(steps=steps, lr=5e-3, batch_size=2, progress=False))
    names = set(load_adapter_package(tmp_path / "adapter").tensors)
    plugged = AutoModelForCausalLM.from_pretrained(plugin(model_dir, tmp_path / "adapter", tmp_path / "plugged"))
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    plugged_state, state = plugged.state_dict(), full.state_dict()
    return written, names, full, {n for n in state if not torch.equal(state[n], plugged_state[n])}


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_the_default_recipe_on_more_families(family, public_text, corpus_file, tmp_path):
    """emulate's default builder (importance scored block by block from the shards, the block fit, the KL phase),
    tune, plug in: the bundle and the plug-in load in plain transformers, the fit lowered every block's error, and
    the plug-in changes exactly the adapter blocks' tensors."""
    model_dir = save_tiny_model(family, tmp_path / "model", n_layers=8)
    written, names, full, changed = _default_round_trip(model_dir, "2-2-2", public_text, corpus_file, tmp_path)
    record = written.manifest.compression.fit
    assert written.manifest.compression.select == "importance" and len(record.blocks) == 2
    assert all(b.after < b.before for b in record.blocks if b.before > 0), record.blocks
    assert changed == names
    blocks = family_of(full).blocks + "."
    assert {int(n[len(blocks):].split(".")[0]) for n in names} == {0, 1, 6, 7}

    ids = torch.tensor([[5, 6, 7, 8]])
    for mode in ("lora", "adapter"):  # the family table's LoRA targets and Houlsby positions resolve
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
    assert checkpoint.stored["lm_head.weight"] == "embed_out.weight" and not checkpoint.unused
    bundle = make_bundle(model_dir, "1-1-1", tmp_path / "bundle", select="uniform", calib_data=None).path
    assert torch.equal(AutoModelForCausalLM.from_pretrained(bundle).lm_head.weight, full.lm_head.weight)

    weights["lm_head.weight"] = weights.pop("embed_out.weight")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert ModelCheckpoint(model_dir).stored["lm_head.weight"] == "lm_head.weight"


def _tiny_moe(model_type: str, out):
    sizes = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=257, bos_token_id=256, eos_token_id=256)
    experts = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
               "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),  # its router subclasses nn.Linear
               "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32)}[model_type]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **experts)).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "phimoe"])
def test_moe_checkpoints_are_read_through_transformers_conversions(model_type, public_text, corpus_file, tmp_path):
    """MoE checkpoints keep one tensor per expert, which transformers stacks into one tensor on load: the streamed
    reader converts them the same way (every tensor equal to from_pretrained's, the fingerprint too), and the
    default recipe round-trips (the bundle holds the stacked layout, which plain transformers loads as is)."""
    from offsite_ds.fingerprints import fingerprint_checkpoint, fingerprint_model
    from offsite_ds.shards import ModelCheckpoint

    model_dir = _tiny_moe(model_type, tmp_path / "model")
    checkpoint = ModelCheckpoint(model_dir)
    assert checkpoint.converted and not checkpoint.unused
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    assert all(torch.equal(checkpoint.get(name), full.state_dict()[name]) for name in checkpoint.state_names())
    assert fingerprint_checkpoint(checkpoint) == fingerprint_model(full)

    written, names, _, changed = _default_round_trip(model_dir, "2-1-2", public_text, corpus_file, tmp_path)
    assert [b.block for b in written.manifest.compression.fit.blocks] == [written.manifest.block_map[2]]
    # PhiMoE's sparsemixer masks every expert whose score trails the top one by more than 2 x jitter_eps: where one
    # expert survives each selection for every token, PhimoeMultiplier's backward gives its router exactly zero
    # gradient, and 2 steps leave it as it was (seen with one emulator of this tiny model, not with another)
    routers = {n for n in names if n.endswith("router.weight")} if model_type == "phimoe" else set()
    assert changed <= names and names - changed <= routers and len(changed) >= len(names) - 1, names - changed
    assert any(".experts." in n for n in names)  # the adapter blocks' experts were tuned and plugged in
    # LoRA only in the adapter blocks (PEFT rewrites a module-path regex into bare names for MoE models)
    tune(written.path, corpus_file, tmp_path / "lora", mode="lora", seq_len=32,
         cfg=TrainConfig(steps=1, lr=5e-3, batch_size=2, progress=False))
    lora = load_adapter_package(tmp_path / "lora").tensors
    assert {int(n.split(".")[2]) for n in lora} == {0, 1, 4, 5} and all("lora_" in n for n in lora)


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


def test_an_unknown_type_with_blocks_but_no_known_final_norm_is_refused_saying_so():
    """LFM2 keeps its blocks at the Llama path but its final norm elsewhere: the line says which part is missing."""
    from offsite_ds.errors import UnsupportedModelError

    config = AutoConfig.for_model("lfm2", vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="blocks are at 'model.layers' but it has no final norm at"):
        family_of(model)


def test_a_pickle_only_model_is_refused_with_a_conversion_that_works(tmp_path, capsys):
    """Older Hub checkpoints (OPT's) ship only pytorch_model.bin: the owner's own model, so the line gives the one
    command that re-saves it as safetensors, and that command works."""
    from offsite_ds.cli import main

    model_dir = save_tiny_model("opt", tmp_path / "opt", n_layers=4)
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    assert main(["emulate", str(model_dir), "--layout", "1-1-1", "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "safetensors weights are required" in err
    exec(err.split('python -c "')[1].split('" and pass')[0])  # noqa: S102 - the command the line tells a user to run
    assert main(["emulate", f"{model_dir}-st", "--layout", "1-1-1", "--select", "uniform", "--no-calib",
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 0


def test_warnings_while_building_are_held_until_the_family_is_known():
    """transformers' messages during a build reach its log handlers only when the model is supported: an encoder's
    advice is dropped with the refusal, a supported model's message is shown after the build."""
    import logging

    from transformers.utils import logging as hf_logging

    from offsite_ds.errors import UnsupportedModelError
    from offsite_ds.families import supported_build

    library, seen = hf_logging.get_logger(), []

    class Seen(logging.Handler):
        def emit(self, record):
            seen.append((record.getMessage(), list(library.handlers)))

    handler = Seen()
    library.addHandler(handler)
    try:
        bert = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=99)
        with torch.device("meta"), pytest.raises(UnsupportedModelError, match="'bert' is not supported"):
            supported_build(lambda: AutoModelForCausalLM.from_config(bert))
        assert seen == []  # BertLMHeadModel's "add is_decoder=True" was held and dropped

        def build():
            hf_logging.get_logger("transformers.models.llama").warning("a supported model's own message")
            assert seen == []  # held while building
            return AutoModelForCausalLM.from_config(tiny_config("llama", n_layers=2))

        with torch.device("meta"):
            model, family = supported_build(build)
        assert family.name == "llama" and [m for m, _ in seen] == ["a supported model's own message"]
        assert handler in seen[0][1]  # replayed through the library's own handlers, restored
    finally:
        library.removeHandler(handler)


def test_a_hybrid_linear_attention_model_keeps_each_blocks_kind(public_text, corpus_file, tmp_path):
    """Qwen3-Next interleaves gated-delta-rule (linear attention) blocks with full-attention ones, named per block in
    `config.layer_types`, and stores its experts one tensor each: the streamed reader converts them as transformers
    does, the default recipe round-trips, and every block of the bundle is the kind of the model block it copies -
    the bundle's `layer_types` sliced with the block map, so plain transformers builds each block as it was."""
    from offsite_ds.shards import ModelCheckpoint

    config = AutoConfig.for_model(
        "qwen3_next", vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, pad_token_id=257, bos_token_id=256, eos_token_id=256)
    kinds = list(config.layer_types)
    assert set(kinds) == {"linear_attention", "full_attention"}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    model_dir = tmp_path / "model"
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    checkpoint = ModelCheckpoint(model_dir)
    assert all(torch.equal(checkpoint.get(name), full.state_dict()[name]) for name in checkpoint.state_names())

    written, names, _, changed = _default_round_trip(model_dir, "2-2-2", public_text, corpus_file, tmp_path)
    assert changed == names
    block_map = written.manifest.block_map
    emulator = AutoModelForCausalLM.from_pretrained(written.path)
    assert emulator.config.layer_types == [kinds[i] for i in block_map]
    full_blocks, kept_blocks = blocks_of(full), blocks_of(emulator)
    for j, i in enumerate(block_map):  # the same modules, so the same kind of attention, block for block
        assert [type(m) for m in kept_blocks[j].children()] == [type(m) for m in full_blocks[i].children()], (j, i)
