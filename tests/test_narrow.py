"""Narrow MLPs for the kept middle blocks (offsite_ds.narrow, `emulate --mlp-width`): narrowing keeps exactly the
channels named, padding back is the same function, scores are the same streamed or in memory, and `emulate` writes
a plain bundle whose kept blocks hold only that many channels."""
import copy
import json
import math

import pytest
import torch

from offsite_ds.tiny import TINY_FAMILIES as FAMILIES  # every family the table names


def _logits(model, ids, replace=None):
    from offsite_ds.surgery import running_blocks

    with torch.no_grad(), running_blocks(model, list(range(8)), replace or {}):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_narrowing_keeps_the_named_channels_and_padding_is_the_same_function(family, tiny_model_dir):
    from offsite_ds.families import family_of, get_path
    from offsite_ds.narrow import mlp_width, narrow_mlp, pad_mlp
    from offsite_ds.runtime import load_model

    model = load_model(tiny_model_dir(family)).eval()
    fam = family_of(model)
    block = get_path(model, fam.blocks)[3]
    full = mlp_width(block, fam)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    base = _logits(model, ids)
    everything = narrow_mlp(copy.deepcopy(block), fam, torch.arange(full))
    assert torch.allclose(_logits(model, ids, {3: everything}), base, atol=1e-5)
    keep = torch.arange(0, full, 3)
    narrow = narrow_mlp(copy.deepcopy(block), fam, keep)
    assert mlp_width(narrow, fam) == len(keep) and sum(p.numel() for p in narrow.parameters()) < \
        sum(p.numel() for p in block.parameters())
    narrowed = _logits(model, ids, {3: narrow})
    assert not torch.allclose(narrowed, base, atol=1e-4)  # a real change
    padded = pad_mlp(copy.deepcopy(narrow), fam, keep, full)
    assert mlp_width(padded, fam) == full
    assert torch.allclose(_logits(model, ids, {3: padded}), narrowed, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(),
                                                 get_path(model, fam.blocks)[3].state_dict().values()))


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_channel_scores_streamed_equal_in_memory_and_rank_a_dead_channel_last(family, tiny_model_dir):
    from offsite_ds.block_stream import StreamedBlocks, as_source
    from offsite_ds.families import family_of, get_path, is_transposed_linear
    from offsite_ds.narrow import channel_scores, kept_channels
    from offsite_ds.runtime import load_model

    model = load_model(tiny_model_dir(family)).eval()
    fam = family_of(model)
    ids = torch.randint(0, 250, (256,), generator=torch.Generator().manual_seed(1))
    loaded = channel_scores(as_source(model), fam, ids, 64, [2, 5])
    streamed = channel_scores(StreamedBlocks(tiny_model_dir(family)), fam, ids, 64, [2, 5])
    for i in (2, 5):
        assert torch.allclose(loaded[i], streamed[i], rtol=1e-5, atol=1e-7) and (loaded[i] > 0).all()
    from offsite_ds.block_stream import full_path, open_stream, sweep
    from offsite_ds.narrow import _Scoring

    scoring = _Scoring(as_source(model), fam, {2, 5})  # scoring watches the forward pass, never changes it
    with scoring.hooked():
        watched = sweep(scoring, open_stream(as_source(model), ids, 64), [full_path(as_source(model))])[0]
    plain = sweep(as_source(model), open_stream(as_source(model), ids, 64), [full_path(as_source(model))])[0]
    assert all(torch.equal(a, b) for a, b in zip(watched, plain)) and sorted(scoring.sums) == [2, 5]
    out = get_path(get_path(model, fam.blocks)[5], fam.mlp_out)
    with torch.no_grad():  # channel 7 can no longer move the output
        (out.weight[7] if is_transposed_linear(out) else out.weight[:, 7]).zero_()
    dead = channel_scores(as_source(model), fam, ids, 64, [5])[5]
    assert dead[7] == 0 and 7 not in kept_channels(dead, dead.numel() - 1).tolist()
    assert kept_channels(torch.tensor([0.5, 2.0, 1.0, 2.0]), 2).tolist() == [1, 3]  # the best, in order


def test_emulate_mlp_width_fits_narrow_blocks_and_writes_a_plain_bundle(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from offsite_ds.bundle import load_bundle
    from offsite_ds.calibrate import mean_nll
    from offsite_ds.errors import ArtifactError
    from offsite_ds.plugin import plugin
    from offsite_ds.roles.tune_adapter import tune
    from offsite_ds.train import TrainConfig
    from offsite_ds.cli import main
    from offsite_ds.data import tokenize_corpus
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.runtime import load_model
    from offsite_ds.tiny import byte_tokenizer
    from offsite_ds.validation import read_manifest

    public = tmp_path / "public.txt"
    public.write_text(" ".join(f"word{i % 37} and item {i % 11} ." for i in range(800)))
    model = str(tiny_model_dir("llama"))
    argv = ["emulate", model, "--layout", "2-3-2", "--calib-data", str(public), "--calib-tokens", "256",
            "--no-progress", "--allow-far", "--select", "uniform", "--mlp-width", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "narrow"), "--no-fit"]) == 0
    assert main([*argv, "--out", str(tmp_path / "fit"), "--fit-tokens", "1024", "--fit-epochs", "2",
                 "--fit-batch-size", "2"]) == 0
    assert capsys.readouterr().err.count("narrow MLPs: the 3 kept middle blocks keep 48 of 96 channels each") == 2
    full = load_model(model)
    width = full.config.intermediate_size // 2
    ids = tokenize_corpus([public.read_text()], byte_tokenizer())[:256]
    narrow_models = {}
    for name in ("narrow", "fit"):
        m = read_manifest(tmp_path / name, BUNDLE_FORMAT)
        assert m.compression.mlp_width.width == width and m.compression.mlp_width.full_width == width * 2
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / name)  # a plain HF directory at the model's width
        emulator = load_bundle(tmp_path / name).model  # ... which load_bundle runs at the narrow width
        narrow_models[name] = emulator
        for position, original in enumerate(m.block_map):
            stored, mlp = plain.model.layers[position].mlp, emulator.model.layers[position].mlp
            live = int((stored.down_proj.weight.abs().sum(0) > 0).sum())
            middle = m.layout.startswith("2-") and 2 <= position < 5
            assert live == (width if middle else width * 2), (name, position, live)
            shapes = {tuple(w.shape) for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T)}
            assert shapes == {(width if middle else width * 2, full.config.hidden_size)}, (name, position, shapes)
            if not middle:  # adapter blocks are the model's own
                assert torch.equal(mlp.up_proj.weight, full.model.layers[original].mlp.up_proj.weight)
        with torch.no_grad():
            assert torch.allclose(emulator(ids[None, :64]).logits, plain(ids[None, :64]).logits, atol=1e-5)
        assert mean_nll(emulator, ids, 128) == pytest.approx(math.log(m.quality.emulator_ppl), rel=1e-4)
    # the data owner tunes through the narrow blocks; the plug-in is the full model with the tuned adapter blocks
    tune(tmp_path / "fit", public, tmp_path / "adapter", mode="full", seq_len=32,
         cfg=TrainConfig(steps=2, lr=5e-3, batch_size=2, progress=False))
    plugged = load_model(plugin(model, tmp_path / "adapter", tmp_path / "plugged"))
    tuned = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert tuned and all(t.shape == plugged.state_dict()[n].shape for n, t in tuned.items())
    assert not torch.equal(plugged.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj.weight)
    manifest = json.loads((tmp_path / "fit" / "offsite.json").read_text())  # a width the stored blocks exceed
    manifest["compression"]["mlp_width"]["width"] = width - 8
    (tmp_path / "fit" / "offsite.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"middle block 2 has {width} live MLP channels, more than"):
        load_bundle(tmp_path / "fit")
    fitted = read_manifest(tmp_path / "fit", BUNDLE_FORMAT)
    assert fitted.compression.fit is not None and all(b.after < b.before for b in fitted.compression.fit.blocks)
    assert main([*argv[:-1], "1", "--out", str(tmp_path / "whole"), "--no-fit"]) == 0  # every channel: whole blocks
    assert read_manifest(tmp_path / "whole", BUNDLE_FORMAT).compression.mlp_width is None
    for bad, why in (("0", "give 0 < F <= 1"), ("1.5", "give 0 < F <= 1")):
        assert main([*argv[:-1], bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and not (tmp_path / "bad").exists()
    assert main([*argv[:2], "--layout", "2-3-2", "--no-calib", "--select", "uniform", "--mlp-width", "0.5",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "needs calibration text" in capsys.readouterr().err
