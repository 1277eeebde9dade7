"""The whole round trip on tiny random models of each family: emulate -> tune -> plug in -> load plainly."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from offsite_ds.adapter_package import load_adapter_package
from offsite_ds.bundle import load_bundle
from offsite_ds.errors import ArtifactError
from offsite_ds.families import blocks_of
from offsite_ds.plugin import load_model_dir, plugin
from offsite_ds.roles.tune_adapter import tune
from offsite_ds.train import TrainConfig


def _cfg(steps=4, **kw):
    return TrainConfig(steps=steps, lr=5e-3, batch_size=2, progress=False, **kw)


def _params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_full_mode(family, tiny_model_dir, tiny_bundle, corpus_file, tmp_path):
    model_dir = tiny_model_dir(family)
    bundle_dir = tiny_bundle(family)
    manifest = json.loads((bundle_dir / "offsite.json").read_text())
    assert manifest["block_map"] == [0, 1, 2, 5, 6, 7]  # middle 2..5, K=2 keeps its first and last
    emulator = AutoModelForCausalLM.from_pretrained(bundle_dir)  # plain transformers loads the bundle
    assert len(blocks_of(emulator)) == 6

    summary = tune(bundle_dir, corpus_file, tmp_path / "adapter", mode="full", cfg=_cfg(), seq_len=32)
    assert summary["steps"] == 4 and summary["final_loss"] > 0
    package = load_adapter_package(tmp_path / "adapter")
    names = set(package.tensors)
    # tensors are named by ORIGINAL block index (6, 7), not by emulator position (4, 5)
    blocks_path = next(p for p in ("model.decoder.layers", "transformer.h", "model.layers")
                       if any(n.startswith(p + ".") for n in names))
    used = {int(n[len(blocks_path) + 1:].split(".")[0]) for n in names}
    assert used == {0, 1, 6, 7}

    plugged_dir = plugin(model_dir, tmp_path / "adapter", tmp_path / "plugged")
    plugged = AutoModelForCausalLM.from_pretrained(plugged_dir)  # plain transformers loads the plug-in
    full = AutoModelForCausalLM.from_pretrained(model_dir)
    plugged_sd, full_sd = plugged.state_dict(), full.state_dict()
    changed = {n for n in full_sd if not torch.equal(full_sd[n], plugged_sd[n])}
    assert changed == names, "exactly the adapter blocks' tensors changed"
    for name in names:
        assert torch.equal(plugged_sd[name], package.tensors[name])
    # the bundle it was tuned on (not aligned): read for nothing but its check; another bundle is refused
    again = AutoModelForCausalLM.from_pretrained(plugin(model_dir, tmp_path / "adapter", tmp_path / "again",
                                                        bundle_dir=bundle_dir)).state_dict()
    assert all(torch.equal(again[n], plugged_sd[n]) for n in names)
    other = tiny_bundle(family, "1-2-1")
    with pytest.raises(ArtifactError, match="not the bundle"):
        plugin(model_dir, tmp_path / "adapter", tmp_path / "wrong", bundle_dir=other)
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize("mode", ["lora", "adapter", "bitfit"])
def test_round_trip_peft_modes_on_opt(mode, tiny_model_dir, tiny_bundle, corpus_file, tmp_path):
    model_dir = tiny_model_dir("opt")
    bundle_dir = tiny_bundle("opt")
    tune(bundle_dir, corpus_file, tmp_path / "adapter", mode=mode, cfg=_cfg(), seq_len=32)
    package = load_adapter_package(tmp_path / "adapter")
    key = {"lora": "lora_", "adapter": "bottleneck_adapter", "bitfit": "bias"}[mode]
    assert all(key in n for n in package.tensors)
    plugged_dir = plugin(model_dir, tmp_path / "adapter", tmp_path / "plugged")
    model, tok = load_model_dir(plugged_dir)
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.allclose(model(ids).logits, base(ids).logits), "the plug-in changed the model"
    if mode == "lora":  # merged LoRA == PEFT applied on the full model, from the PEFT-format export
        from peft import PeftModel

        assert not any("lora" in n for n in model.state_dict())
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter" / "peft")
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_emulator_stays_frozen_but_adapter_moves(tiny_bundle, corpus_file, tmp_path):
    from offsite_ds.plugin import apply_to_emulator

    bundle_dir = tiny_bundle("bloom")
    tune(bundle_dir, corpus_file, tmp_path / "adapter", mode="full", cfg=_cfg(), seq_len=32)
    bundle = load_bundle(bundle_dir)
    before = _params(bundle.model)
    tuned = apply_to_emulator(bundle, load_adapter_package(tmp_path / "adapter"))
    after = tuned.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith(("transformer.h.0.", "transformer.h.1.", "transformer.h.4.",
                                       "transformer.h.5.")) for n in moved)


def test_best_adapter_is_kept_by_emulator_eval(tiny_bundle, corpus_file, tmp_path):
    bundle_dir = tiny_bundle("gpt2", "1-2-1")
    summary = tune(bundle_dir, corpus_file, tmp_path / "adapter", mode="full", cfg=_cfg(steps=6, eval_every=2),
                   seq_len=32, eval_data=corpus_file, max_eval_tokens=256)
    training = load_adapter_package(tmp_path / "adapter").manifest.training
    assert training["best_eval_loss"] == summary["best_eval_loss"]
    assert training["best_step"] == summary["best_step"] and training["best_step"] in (2, 4, 6)


def test_evaluating_during_training_leaves_the_trajectory_unchanged(tiny_bundle, corpus_file, tmp_path):
    """Evaluation mid-run leaves the optimiser, the data order and the train mode as they were: with eval_every 2
    or only at the end (the demo's default) every step's loss is the same, so eval_every only decides which step's
    adapter ships."""
    bundle_dir = tiny_bundle("gpt2", "1-2-1")
    runs = {every: tune(bundle_dir, corpus_file, tmp_path / f"adapter{every}", mode="full",
                        cfg=_cfg(steps=6, eval_every=every, log_every=1), seq_len=32, eval_data=corpus_file,
                        max_eval_tokens=256) for every in (2, 0)}
    assert [h["step"] for h in runs[0]["loss_history"]] == list(range(1, 7))
    assert runs[2]["loss_history"] == runs[0]["loss_history"] and runs[2]["final_loss"] == runs[0]["final_loss"]
    assert runs[0]["best_step"] == 6 and runs[2]["best_step"] in (2, 4, 6)


def test_compression_ablation_methods(tiny_model_dir, tmp_path):
    from offsite_ds.emulator import build_emulator
    from offsite_ds.sandwich import Layout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("opt"))
    pruned, _ = build_emulator(model, Layout(2, 4, 2), "prune", prune_ratio=0.5)
    w = blocks_of(pruned)[3].fc1.weight
    assert 0.45 < float((w == 0).float().mean()) < 0.55
    assert float((blocks_of(pruned)[0].fc1.weight == 0).float().mean()) < 0.01, "adapter blocks untouched"
    quant, _ = build_emulator(model, Layout(2, 4, 2), "quantize", quant_bits=4)
    q = blocks_of(quant)[3].fc1.weight
    assert all(len(torch.unique(row)) <= 15 for row in q)
    assert torch.equal(blocks_of(quant)[0].fc1.weight, blocks_of(model)[0].fc1.weight)


def test_report_command_scores_the_four_rows(tiny_model_dir, tiny_bundle, corpus_file, tmp_path, capsys):
    from offsite_ds.cli import main
    from offsite_ds.evaluate import perplexity

    model_dir = tiny_model_dir("gpt2")
    bundle_dir = tiny_bundle("gpt2")
    tune(bundle_dir, corpus_file, tmp_path / "adapter", mode="full", cfg=_cfg(), seq_len=32)
    assert main(["report", "--model", str(model_dir), "--bundle", str(bundle_dir), "--adapter",
                 str(tmp_path / "adapter"), "--data", str(corpus_file), "--seq-len", "32", "--max-tokens", "256",
                 "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "r.json").read_text())["perplexity"]
    assert list(rows) == ["Full zero-shot", "Emulator zero-shot", "OT Emulator", "OT Plug-in"]
    assert all(f"| {name} | {value:.2f} |" in printed for name, value in rows.items())
    model, tok = load_model_dir(model_dir)
    direct = perplexity(model, tok, [corpus_file.read_text()], seq_len=32, max_tokens=256)
    assert rows["Full zero-shot"] == pytest.approx(direct)
    assert rows["OT Plug-in"] != rows["Full zero-shot"]
