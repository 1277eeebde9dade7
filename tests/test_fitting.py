"""Fitting the kept blocks to their runs (offsite_ds.fitting): the fitted emulator is closer to the full model
on text it was fitted on and on held-out text, and the model itself is left untouched."""
import math
import re

import pytest
import torch

from conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_fitted_blocks_bring_the_emulator_closer_to_the_full_model(family, tiny_model_dir):
    from offsite_ds.calibrate import mean_nll
    from offsite_ds.data import tokenize_corpus
    from offsite_ds.fitting import FitSettings, fit_kept_blocks
    from offsite_ds.runtime import load_model
    from offsite_ds.surgery import running_blocks
    from offsite_ds.tiny import byte_tokenizer

    torch.manual_seed(0)
    model = load_model(tiny_model_dir(family)).eval()
    with torch.no_grad():  # random blocks near the identity would make every emulator trivially close
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(6.0)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    text = " ".join(f"word{i % 37} and item {i % 11} ." for i in range(600))
    ids = tokenize_corpus([text], byte_tokenizer())
    fit_ids, held = ids[:2048], ids[2048:2560]
    block_map = [0, 1, 3, 6, 7]  # layout 1-3-1 of 8 blocks: bottom 0, kept middle 1, 3, 6, top 7
    full = mean_nll(model, held, 64)
    with running_blocks(model, block_map):
        before = mean_nll(model, held, 64) - full
    fitted, report, _ = fit_kept_blocks(model, fit_ids, block_map, 1, 3, FitSettings(tokens=2048, epochs=6, lr=3e-3,
                                                                             seq_len=64, batch_size=8))
    assert sorted(fitted) == [1, 3, 6] and [r["end"] for r in report] == [3, 6, 7]
    assert all(r["after"] < r["before"] for r in report), report
    with running_blocks(model, block_map, fitted):
        after = mean_nll(model, held, 64) - full
    assert math.isfinite(after) and after < before, (before, after)  # on text it never saw
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())  # the model is untouched


def test_emulate_fit_writes_the_fitted_blocks_and_records_them(tiny_model_dir, tmp_path, capsys):
    from offsite_ds.bundle import load_bundle
    from offsite_ds.calibrate import mean_nll
    from offsite_ds.cli import main
    from offsite_ds.data import tokenize_corpus
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.runtime import load_model
    from offsite_ds.tiny import byte_tokenizer
    from offsite_ds.validation import read_manifest

    public = tmp_path / "public.txt"
    public.write_text(" ".join(f"word{i % 37} and item {i % 11} ." for i in range(800)))
    model = str(tiny_model_dir("llama"))
    argv = ["emulate", model, "--layout", "2-2-2", "--calib-data", str(public), "--calib-tokens", "256",
            "--no-progress", "--allow-far"]
    assert main([*argv, "--out", str(tmp_path / "plain"), "--select", "uniform", "--no-fit"]) == 0
    assert read_manifest(tmp_path / "plain", BUNDLE_FORMAT).compression.fit is None
    # a --fit-* flag asks for the fit as --fit does
    assert main([*argv, "--out", str(tmp_path / "fit"), "--select", "uniform", "--fit-tokens", "1024",
                 "--fit-epochs", "2", "--fit-lr", "1e-3", "--fit-batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "kept blocks fitted on 1024 tokens of public text, KL to the full model" in out
    assert re.search(r"KL to the full model \d+\.\d+ -> \d+\.\d+ on 256 held-out tokens", out), out
    m = read_manifest(tmp_path / "fit", BUNDLE_FORMAT)
    assert m.compression.fit.tokens == 1024 and [b.block for b in m.compression.fit.blocks] == [2, 5]
    assert m.compression.fit.batch_size == 2
    assert m.compression.calibration.tokens == 256 and m.quality.tokens == 256
    plain, fitted = load_bundle(tmp_path / "plain").model, load_bundle(tmp_path / "fit").model
    full = load_model(model)
    for position in range(6):  # adapter blocks untouched, kept middle blocks trained
        same = all(torch.equal(a, b) for a, b in zip(plain.model.layers[position].state_dict().values(),
                                                      fitted.model.layers[position].state_dict().values()))
        assert same == (position not in (2, 3)), position
    assert torch.equal(full.model.layers[0].mlp.up_proj.weight, fitted.model.layers[0].mlp.up_proj.weight)
    ids = tokenize_corpus([public.read_text()], byte_tokenizer())[:256]  # the guard's tokens, never fitted on
    assert mean_nll(fitted, ids, 128) == pytest.approx(math.log(m.quality.emulator_ppl), rel=1e-4)
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "x"), "--fit", "--fit-tokens", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fewer --fit-tokens" in err and not (tmp_path / "x").exists()
    assert main([*argv, "--out", str(tmp_path / "y"), "--fit", "--fit-epochs", "0"]) == 2
    assert "--fit-epochs 0 must be at least 1" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "z"), "--fit", "--fit-batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fit-batch-size 0 must be at least 1" in err


def test_the_end_to_end_kl_phase_lowers_the_kl_and_leaves_the_model_alone(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    from offsite_ds.cli import main
    from offsite_ds.data import tokenize_corpus
    from offsite_ds.fitting import FitSettings, fit_kept_blocks
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.runtime import load_model
    from offsite_ds.tiny import byte_tokenizer
    from offsite_ds.validation import read_manifest

    torch.manual_seed(0)
    model = load_model(tiny_model_dir("gpt2")).eval()
    with torch.no_grad():  # as above: a random model's distributions are near uniform, every KL near 0
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name and "wpe" not in name:
                p.mul_(6.0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    text = " ".join(f"word{i % 37} and item {i % 11} ." for i in range(600))
    ids = tokenize_corpus([text], byte_tokenizer())[:1024]
    block_map = [0, 1, 3, 6, 7]
    settings = FitSettings(tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=3, kl_lr=1e-3,
                           kl_rank=0)  # all weights (rank 8, the default, below)
    fitted, report, kl = fit_kept_blocks(model, ids, block_map, 1, 3, settings)
    assert kl is not None and kl["after"] < kl["before"], kl
    assert sorted(fitted) == [1, 3, 6] and not any(p.requires_grad for b in fitted.values() for p in b.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())
    assert fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(tokens=1024, epochs=1, seq_len=64,
                                                                    kl_epochs=0))[2] is None

    import offsite_ds.fitting as fitting  # the KL phase reads more tokens than the block fit: its own teacher pass

    streamed = []
    open_stream = fitting.open_stream
    monkeypatch.setattr(fitting, "open_stream", lambda s, i, *a: streamed.append(i.numel()) or open_stream(s, i, *a))
    more = FitSettings(tokens=512, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=2, kl_lr=1e-3,
                       kl_tokens=1024)
    assert more.public_tokens == 1024 and FitSettings(tokens=512, kl_tokens=1024, kl_epochs=0).public_tokens == 512
    kl_more = fit_kept_blocks(model, ids, block_map, 1, 3, more)[2]
    assert streamed == [512, 1024] and kl_more["after"] < kl_more["before"], (streamed, kl_more)
    streamed.clear()
    fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(tokens=1024, epochs=1, seq_len=64, kl_epochs=1))
    assert streamed == [1024]  # the same tokens: one teacher pass gives the fit's and the KL's states
    monkeypatch.undo()

    # --fit-kl-rank: a low-rank update of each matrix (GPT-2's are Conv1D), merged back into plain blocks
    plain = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(tokens=1024, epochs=1, lr=1e-3, seq_len=64,
                                                                      batch_size=4, kl_epochs=0))[0]
    low, _, kl_low = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(
        tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=3, kl_lr=3e-3, kl_rank=2))
    assert kl_low["after"] < kl_low["before"], kl_low
    for i in (1, 3, 6):
        assert sorted(low[i].state_dict()) == sorted(plain[i].state_dict())  # merged: no parametrization left
        attn, attn_plain = low[i].attn.c_attn.weight, plain[i].attn.c_attn.weight
        update = (attn - attn_plain).double()
        assert update.abs().max() > 0 and torch.linalg.matrix_rank(update, atol=1e-6) <= 2  # rank 2, not more

    # a bf16 owner, streamed as emulate streams it: the fitted matrices wait and stay in bf16 (_NarrowLinear), only the
    # updates and norms in fp32
    from offsite_ds.block_stream import StreamedBlocks

    llama = load_model(tiny_model_dir("llama")).eval()
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(6.0)
    llama.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    low, _, kl_bf16 = fit_kept_blocks(StreamedBlocks(tmp_path / "bf16"), ids, block_map, 1, 3, FitSettings(
        tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=3, kl_lr=3e-3, kl_rank=2),
        store_dtype=torch.bfloat16)
    assert math.isfinite(kl_bf16["after"]) and kl_bf16["after"] < kl_bf16["before"], kl_bf16
    assert {p.dtype for b in low.values() for p in b.parameters()} == {torch.bfloat16}

    public = tmp_path / "public.txt"
    public.write_text(" ".join(f"word{i % 37} and item {i % 11} ." for i in range(800)))
    assert main(["emulate", str(tiny_model_dir("llama")), "--layout", "2-2-2", "--calib-data", str(public),
                 "--calib-tokens", "256", "--no-progress", "--allow-far", "--out", str(tmp_path / "kl"), "--fit",
                 "--fit-tokens", "512", "--fit-epochs", "1", "--fit-kl-epochs", "1", "--fit-kl-rank", "2"]) == 0
    fit = read_manifest(tmp_path / "kl", BUNDLE_FORMAT).compression.fit
    assert fit.kl_epochs == 1 and fit.kl is not None and fit.kl.before >= 0 and fit.kl_tokens == 0
    assert fit.kl_rank == 2 and fit.precision == FitSettings().precision  # what ran: auto resolved
    capsys.readouterr()
    assert main(["emulate", str(tiny_model_dir("llama")), "--layout", "2-2-2", "--calib-data", str(public),
                 "--calib-tokens", "256", "--no-progress", "--allow-far", "--out", str(tmp_path / "x"), "--fit",
                 "--fit-tokens", "512", "--fit-kl-tokens", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fewer --fit-kl-tokens" in err and not (tmp_path / "x").exists()
    with pytest.raises(Exception, match="--fit-kl-epochs -1"):
        FitSettings(kl_epochs=-1)


def emulate_tiny(model_dir, public, out, *flags: str, fit: bool = True) -> int:
    """`emulate` at 2-2-2 calibrated on `public`, with `--fit` at the smallest budget (or `--no-fit`), plus `flags`."""
    from offsite_ds.cli import main

    fitting = ["--fit", "--fit-tokens", "512", "--fit-epochs", "1", "--fit-kl-epochs", "1"] if fit else ["--no-fit"]
    return main(["emulate", str(model_dir), "--layout", "2-2-2", "--calib-data", str(public), "--calib-tokens", "256",
                 "--no-progress", "--allow-far", "--out", str(out), *fitting, *flags])


def sharpened_model_and_text(model_dir):
    """A tiny random model with its block matrices x6 (its distributions are near uniform otherwise: the KL phase
    gets something to match), a repetitive public text and its first 1,024 byte tokens."""
    from offsite_ds.data import tokenize_corpus
    from offsite_ds.runtime import load_model
    from offsite_ds.tiny import byte_tokenizer

    torch.manual_seed(0)
    model = load_model(model_dir).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not any(e in name for e in ("wte", "wpe", "embed", "word_embeddings")):
                p.mul_(6.0)
    text = " ".join(f"word{i % 37} and item {i % 11} ." for i in range(600))
    return model, text, tokenize_corpus([text], byte_tokenizer())[:1024]


@pytest.mark.parametrize("rank", [0, 8])
def test_a_kl_phase_that_does_not_lower_its_loss_is_dropped(rank, tiny_model_dir):
    """The KL phase is on by default, on models nobody measured it on: where it ends no lower than it started on
    its own tokens (here an lr of 10 blows it up), the blocks ship as the block fit left them, and the record says
    so. A low-rank update is judged before its merge and dropped unmerged; all weights are restored."""
    from offsite_ds.fitting import FitSettings, fit_kept_blocks

    model, _, ids = sharpened_model_and_text(tiny_model_dir("llama"))
    block_map = [0, 1, 3, 6, 7]
    kw = dict(tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_rank=rank)
    plain = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(kl_epochs=0, **kw))[0]
    dropped, _, kl = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(kl_epochs=1, kl_lr=10.0, **kw))
    assert kl["reverted"] and kl["after"] == kl["before"], kl
    for i, block in plain.items():
        assert all(torch.equal(a.float(), b.float()) for a, b in zip(block.state_dict().values(),
                                                                     dropped[i].state_dict().values())), i
    kept = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(kl_epochs=2, kl_lr=1e-3 * (1 + 2 * bool(rank)),
                                                                    **kw))[2]
    assert "reverted" not in kept and kept["after"] < kept["before"], kept


def test_the_kl_phase_is_judged_on_held_out_public_tokens(tiny_model_dir, monkeypatch):
    """With `held_out` (what `emulate` passes: the guard's calibration tokens, which the fit never reads), the KL
    phase's before and after are the emulator's KL on those tokens, re-measured here with the model's own forward
    pass, and they decide whether its change is kept: two passes over them, none over the training tokens. Both are
    measured in eval mode: with dropout in the blocks, `before` was once measured with it on."""
    import torch.nn.functional as F

    import offsite_ds.fitting as fitting
    from offsite_ds.data import tokenize_corpus
    from offsite_ds.fitting import FitSettings, fit_kept_blocks
    from offsite_ds.surgery import running_blocks
    from offsite_ds.tiny import byte_tokenizer

    model, text, ids = sharpened_model_and_text(tiny_model_dir("llama"))
    for layer in model.model.layers:  # trained in train mode, measured without
        layer.self_attn.attention_dropout = 0.5
    held = tokenize_corpus([text.replace("word", "term")], byte_tokenizer())[:256]  # 4 windows of 64, one batch
    block_map = [0, 1, 3, 6, 7]
    kw = dict(tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_rank=2, kl_lr=3e-3)

    @torch.no_grad()
    def held_out_kl(fitted: dict) -> float:  # mean over every position but each window's first
        windows = held.view(-1, 64)
        teacher = model(input_ids=windows).logits[:, 1:].float()
        with running_blocks(model, block_map, fitted):
            student = model(input_ids=windows).logits[:, 1:].float()
        return float(F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                              reduction="none").sum(-1).mean())

    torch.manual_seed(1)  # dropout draws from the global generator: the same block fit in both runs
    plain = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(kl_epochs=0, **kw))[0]
    grad_on, head_kl = [], fitting.head_kl
    monkeypatch.setattr(fitting, "head_kl", lambda *a, **k: grad_on.append(torch.is_grad_enabled()) or head_kl(*a, **k))
    torch.manual_seed(1)
    fitted, _, kl = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(kl_epochs=2, **kw), held_out=held)
    assert kl["held_out_tokens"] == 256 and "reverted" not in kl, kl
    assert kl["before"] == pytest.approx(held_out_kl(plain), rel=1e-4)  # the block fit's emulator, held out
    assert kl["after"] == pytest.approx(held_out_kl(fitted), rel=1e-3) and kl["after"] < kl["before"], kl
    assert grad_on.count(False) == 2 and grad_on.count(True) == 2 * 4  # before and after; 2 epochs of 4 batches

    torch.manual_seed(1)
    blown = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(kl_epochs=1, **{**kw, "kl_lr": 10.0}),
                            held_out=held)
    assert blown[2]["reverted"] and blown[2]["after"] == blown[2]["before"] == kl["before"], blown[2]
    assert all(torch.equal(a, b) for i in plain for a, b in zip(plain[i].state_dict().values(),
                                                                 blown[0][i].state_dict().values()))


def test_a_low_rank_kl_phase_measures_fp32_blocks_once_after_training_and_narrow_ones_again_after_the_merge(
        tiny_model_dir, tmp_path, monkeypatch):
    """The KL after the phase is measured before the merge, which decides whether the update is kept. Merged into
    fp32 matrices it is the same function up to rounding, so that measurement stands (a pass over the KL tokens
    fewer); a bf16 merge rounds part of the update away, so those blocks are measured again as they ship."""
    import offsite_ds.fitting as fitting
    from offsite_ds.block_stream import StreamedBlocks
    from offsite_ds.fitting import FitSettings, fit_kept_blocks

    model, _, ids = sharpened_model_and_text(tiny_model_dir("llama"))
    block_map, batches = [0, 1, 3, 6, 7], 1024 // (4 * 64)
    settings = FitSettings(tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=2, kl_lr=3e-3,
                           kl_rank=2)
    grad_on, head_kl = [], fitting.head_kl
    monkeypatch.setattr(fitting, "head_kl", lambda *a, **k: grad_on.append(torch.is_grad_enabled()) or head_kl(*a, **k))
    kl = fit_kept_blocks(model, ids, block_map, 1, 3, settings)[2]
    assert kl["after"] < kl["before"] and grad_on.count(False) == 2 * batches, (kl, grad_on)  # before, after
    assert grad_on.count(True) == 2 * batches  # the steps: 2 epochs

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    grad_on.clear()
    kl = fit_kept_blocks(StreamedBlocks(tmp_path / "bf16"), ids, block_map, 1, 3, settings,
                         store_dtype=torch.bfloat16)[2]
    assert math.isfinite(kl["after"]) and grad_on.count(False) == 3 * batches, (kl, grad_on)  # + as shipped


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_interface_term_keeps_the_top_adapters_input_closer_to_the_full_models(family, tiny_model_dir, tmp_path,
                                                                                   capsys):
    from offsite_ds.fitting import FitSettings, fit_kept_blocks, relative_error
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.surgery import running_blocks
    from offsite_ds.validation import read_manifest

    model, text, ids = sharpened_model_and_text(tiny_model_dir(family))
    block_map = [0, 1, 3, 6, 7]  # bottom 0, kept 1 3 6, top 7: the top adapter's input is block 7's
    kw = dict(tokens=512, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=4, kl_lr=3e-3, kl_tokens=1024)
    runs = {w: fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(kl_interface=w, **kw)) for w in (1e-9, 10.0)}
    (_, _, weak), (fitted, _, strong) = runs[1e-9], runs[10.0]
    assert weak["interface_before"] == pytest.approx(strong["interface_before"])  # the same start, measured alike
    assert strong["interface_after"] < weak["interface_after"], (weak, strong)
    assert strong["after"] < strong["before"]  # the KL still falls

    hidden = {}  # the reported error is the state entering block 7 against the full model's, on the KL's tokens

    def catch(positions, replace=None):
        block = model.model.layers[7] if family == "llama" else model.transformer.h[7]
        handle = block.register_forward_pre_hook(
            lambda m, args, kwargs: hidden.__setitem__(len(hidden), args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
        try:
            with running_blocks(model, positions, replace), torch.no_grad():
                model(input_ids=ids.view(-1, 64), use_cache=False)
        finally:
            handle.remove()
        return hidden.pop(len(hidden) - 1)

    full, emulated = catch(list(range(8))), catch(block_map, fitted)
    assert float(relative_error(emulated, full)) == pytest.approx(strong["interface_after"], rel=0.05)

    with pytest.raises(Exception, match="--fit-kl-interface -1"):
        FitSettings(kl_interface=-1)
    with pytest.raises(Exception, match="give --fit-kl-epochs >= 1"):
        FitSettings(kl_interface=1.0, kl_epochs=0)
    public = tmp_path / "public.txt"
    public.write_text(text)
    assert emulate_tiny(tiny_model_dir(family), public, tmp_path / "b", "--fit-kl-interface", "1") == 0
    fit = read_manifest(tmp_path / "b", BUNDLE_FORMAT).compression.fit
    assert fit.kl_interface == 1.0 and fit.kl.interface_after is not None and fit.kl.interface_before > 0
    capsys.readouterr()
    assert emulate_tiny(tiny_model_dir(family), public, tmp_path / "c", "--fit-kl-interface", "1", fit=False) == 2
    err = capsys.readouterr().err  # with --no-fit it would change nothing: refused
    assert "--fit-kl-interface" in err and "drop --no-fit" in err


def test_a_low_rank_update_merges_into_the_weight_it_was_added_to():
    """The hooked layer and the merged one compute the same, whichever way round the layer stores its weight
    (square layers included, where a transposed merge would pass unnoticed by shape)."""
    from transformers.pytorch_utils import Conv1D

    from offsite_ds.fitting import low_rank_params, merge_low_rank

    torch.manual_seed(0)
    for layer in (torch.nn.Linear(8, 8), Conv1D(8, 8), torch.nn.Linear(8, 5), Conv1D(5, 8)):
        block = torch.nn.Sequential(layer)
        trainable, updates = low_rank_params([block], 2, torch.Generator().manual_seed(0))
        assert len(updates) == 1 and all(p.requires_grad for p in trainable)
        with torch.no_grad():
            updates[0][1].b.normal_()
        x = torch.randn(3, 8)
        hooked = block(x)
        merge_low_rank(updates)
        assert torch.allclose(block(x), hooked, atol=1e-5), type(layer).__name__
        assert not layer._forward_hooks


def test_an_aligned_bundle_ships_trained_adapter_blocks_and_the_plug_in_takes_them_out(tiny_model_dir, corpus_file,
                                                                                      tmp_path, capsys):
    """--fit-align: the KL phase trains the adapter blocks too (the emulator gets closer with them), the data owner
    tunes from those, and the plug-in adds only the data owner's change to the model's own blocks."""
    from offsite_ds.adapter_package import load_adapter_package
    from offsite_ds.bundle import load_bundle
    from offsite_ds.cli import main
    from offsite_ds.fitting import FitSettings, fit_kept_blocks
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.plugin import load_model_dir
    from offsite_ds.roles.tune_adapter import tune
    from offsite_ds.runtime import load_model
    from offsite_ds.train import TrainConfig
    from offsite_ds.validation import read_manifest

    model, text, ids = sharpened_model_and_text(tiny_model_dir("gpt2"))  # far from the identity: the emulator is
    # far from the model
    block_map = [0, 1, 3, 6, 7]
    kw = dict(tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=3, kl_lr=1e-3)
    middle_only = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(**kw))[2]
    aligned, _, kl = fit_kept_blocks(model, ids, block_map, 1, 3, FitSettings(**kw, align=True))
    assert sorted(aligned) == [0, 1, 3, 6, 7]  # the adapter blocks 0 and 7 trained too
    assert kl["before"] == pytest.approx(middle_only["before"], rel=1e-4)  # from the embeddings, same blocks: same KL
    assert kl["after"] < kl["before"], kl
    assert not torch.equal(aligned[7].mlp.c_fc.weight, model.transformer.h[7].mlp.c_fc.weight)
    with pytest.raises(Exception, match="--fit-align .*--fit-kl-epochs"):
        FitSettings(align=True, kl_epochs=0)

    public = tmp_path / "public.txt"
    public.write_text(" ".join(f"word{i % 37} and item {i % 11} ." for i in range(800)))
    model_dir = tiny_model_dir("llama")
    assert main(["emulate", str(model_dir), "--layout", "2-2-2", "--calib-data", str(public), "--calib-tokens", "256",
                 "--no-progress", "--allow-far", "--out", str(tmp_path / "bundle"), "--select", "uniform", "--fit",
                 "--fit-tokens", "512", "--fit-epochs", "1", "--fit-kl-epochs", "2", "--fit-kl-lr", "1e-3",
                 "--fit-align"]) == 0
    kept = read_manifest(tmp_path / "bundle", BUNDLE_FORMAT).compression.fit.kl
    assert not kept.reverted and kept.held_out_tokens == 256  # the KL phase kept, judged on the calibration tokens
    capsys.readouterr()
    assert main(["emulate", str(model_dir), "--layout", "2-2-2", "--calib-data", str(public), "--no-progress",
                 "--out", str(tmp_path / "nofit"), "--fit-align", "--no-fit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "drop --no-fit" in err and not (tmp_path / "nofit").exists()
    bundle = load_bundle(tmp_path / "bundle")
    full = load_model(model_dir)
    assert bundle.manifest.aligned and bundle.manifest.compression.fit.align
    shipped_0 = bundle.model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(shipped_0, full.model.layers[0].mlp.up_proj.weight)  # not the model's own block

    cfg = TrainConfig(steps=3, lr=5e-3, batch_size=2, progress=False)
    tune(tmp_path / "bundle", corpus_file, tmp_path / "full", mode="full", cfg=cfg, seq_len=32)
    package = load_adapter_package(tmp_path / "full")
    assert package.manifest.aligned
    capsys.readouterr()
    argv = ["plugin", str(model_dir), str(tmp_path / "full")]
    assert main([*argv, "--out", str(tmp_path / "p0")]) == 2  # the blocks' own tensors need the shipped ones
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bundle" in err and not (tmp_path / "p0").exists()
    assert main([*argv, "--out", str(tmp_path / "p1"), "--bundle", str(tmp_path / "bundle")]) == 0
    plugged = load_model_dir(tmp_path / "p1")[0].state_dict()
    shipped = bundle.model.state_dict()
    for name, tuned in package.tensors.items():
        position = bundle.block_map.index(int(name.split(".")[2]))
        at = name.replace(f"layers.{name.split('.')[2]}.", f"layers.{position}.")
        expected = full.state_dict()[name] + (tuned - shipped[at])  # the model's block + the data owner's change
        assert torch.allclose(plugged[name], expected, atol=1e-6), name
    untouched = [n for n in plugged if n not in package.tensors]
    assert all(torch.equal(plugged[n], full.state_dict()[n]) for n in untouched)
    import json
    import shutil
    shutil.copytree(tmp_path / "full", tmp_path / "altered")  # a package that hides what it was tuned on
    manifest = json.loads((tmp_path / "altered" / "offsite.json").read_text())
    (tmp_path / "altered" / "offsite.json").write_text(json.dumps({**manifest, "aligned": False}))
    assert main(["plugin", str(model_dir), str(tmp_path / "altered"), "--out", str(tmp_path / "pa"), "--bundle",
                 str(tmp_path / "bundle")]) == 2
    assert "altered" in capsys.readouterr().err and not (tmp_path / "pa").exists()
    other = tmp_path / "other"
    assert main(["emulate", str(model_dir), "--layout", "2-2-2", "--no-calib", "--select", "uniform", "--out",
                 str(other)]) == 0
    assert main([*argv, "--out", str(tmp_path / "p2"), "--bundle", str(other)]) == 2
    assert "not the bundle" in capsys.readouterr().err

    # LoRA adds its product to the model's own blocks: no bundle needed, and the alignment stays out
    tune(tmp_path / "bundle", corpus_file, tmp_path / "lora", mode="lora", cfg=cfg, seq_len=32)
    assert main(["plugin", str(model_dir), str(tmp_path / "lora"), "--out", str(tmp_path / "p3")]) == 0
    plugged = load_model_dir(tmp_path / "p3")[0].state_dict()
    lora = load_adapter_package(tmp_path / "lora")
    for key in [n for n in lora.tensors if ".lora_A." in n]:
        weight = key.replace(".lora_A.weight", ".weight")
        change = (plugged[weight] - full.state_dict()[weight]).double()
        assert torch.linalg.matrix_rank(change, atol=1e-5) <= lora.manifest.mode_settings.r, weight  # B A alone


def test_the_kl_lr_defaults_to_the_one_chosen_for_all_weights_or_a_low_rank_update():
    """KL_LR: a low-rank update (rank 8, the default: the owner's memory) wants a 10x larger lr (3e-3; 3e-4 for all
    weights), unless one is given; the CLI's None means the same, so `--fit-kl-rank 0` alone gets 3e-4 and is
    listed once as given."""
    from offsite_ds.cli import build_parser
    from offsite_ds.cli.train_args import fit_flags_given, fit_settings_from_args
    from offsite_ds.errors import OffsiteError
    from offsite_ds.fitting import KL_LR, FitSettings

    assert FitSettings().kl_rank == 8 and FitSettings().kl_lr == KL_LR[True] == 3e-3
    assert FitSettings(kl_rank=0).kl_lr == KL_LR[False] == 3e-4
    assert FitSettings(kl_rank=8, kl_lr=1e-3).kl_lr == 1e-3
    args = build_parser().parse_args(["emulate", "m", "--layout", "2-2-2", "--out", "x", "--fit-kl-rank", "0"])
    assert fit_settings_from_args(args).kl_lr == 3e-4 and fit_flags_given(args) == ["--fit-kl-rank"]
    with pytest.raises(OffsiteError, match="--fit-kl-lr"):
        FitSettings(kl_lr=0.0)


def test_fit_precision_autocasts_the_training_steps_where_bf16_is_native(tiny_model_dir, monkeypatch):
    """auto resolves to bf16 on a GPU that multiplies bf16 natively, else fp32 - on a CPU always, where the owner's
    memory binds (the manifest records which ran); bf16 runs every training forward of the block fit and the KL
    phase under autocast, and still lowers the KL."""
    import offsite_ds.fitting as fitting
    import offsite_ds.runtime as runtime
    from offsite_ds.errors import OffsiteError
    from offsite_ds.fitting import FitSettings, fit_kept_blocks

    for device, native, resolved in (("cuda", True, "bf16"), ("cuda", False, "fp32"), ("cpu", True, "fp32")):
        monkeypatch.setattr(fitting, "default_device_type", lambda device=device: device)
        monkeypatch.setattr(runtime, "native_bf16", lambda _device, native=native: native)
        assert FitSettings().precision == resolved and FitSettings(precision="fp32").precision == "fp32"
        assert FitSettings(precision="bf16").precision == "bf16"  # asked for: as asked, on any device
    with pytest.raises(OffsiteError, match="--fit-precision fp16"):
        FitSettings(precision="fp16")
    model, _, ids = sharpened_model_and_text(tiny_model_dir("llama"))
    train, seen = fitting._train, []

    def recording(params, loss_of, *args, **kw):
        def loss(b):
            seen.append(torch.is_autocast_enabled("cpu"))
            return loss_of(b)
        return train(params, loss, *args, **kw)

    monkeypatch.setattr(fitting, "_train", recording)
    for precision in ("bf16", "fp32"):
        seen.clear()
        kl = fit_kept_blocks(model, ids, [0, 1, 3, 6, 7], 1, 3, FitSettings(
            tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=2, kl_lr=1e-3, precision=precision))[2]
        assert len(seen) == 3 * 4 + 2 * 4 and set(seen) == {precision == "bf16"}  # 3 blocks x 4 steps, 8 KL steps
        assert math.isfinite(kl["after"]) and kl["after"] < kl["before"], (precision, kl)


def test_the_fit_can_read_the_models_own_text_and_records_it(tiny_model_dir, tmp_path, capsys):
    """--fit-text self: the sampler draws whole windows from the model's own distribution, seeded; emulate records
    the samples and reads no more public text than the guard's."""
    from offsite_ds.cli import main
    from offsite_ds.fitting import FitSettings, self_text
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.runtime import load_model
    from offsite_ds.validation import read_manifest
    from transformers import AutoTokenizer

    model_dir = tiny_model_dir("llama")
    model = load_model(model_dir)
    ids = self_text(model, 1, 100, 32, seed=3, batch_size=2)
    assert ids.shape == (128,) and ids.dtype == torch.long  # 100 tokens: four whole 32-token windows
    assert (ids.view(4, 32)[:, 0] == 1).all() and 0 <= int(ids.min()) and int(ids.max()) < model.config.vocab_size
    assert torch.equal(ids, self_text(model, 1, 100, 32, seed=3, batch_size=2))  # seeded
    assert not torch.equal(ids, self_text(model, 1, 100, 32, seed=4))
    assert len(set(ids.tolist())) > 20  # sampled, not greedy: a random model's argmax repeats
    g = model.generation_config  # a chat checkpoint's sampling defaults do not reshape the model's distribution
    g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.no_repeat_ngram_size = 0.3, 0.5, 5, 1.5, 2
    assert torch.equal(ids, self_text(model, 1, 100, 32, seed=3, batch_size=2))
    with pytest.raises(Exception, match="--fit-text story must be one of public, self"):
        FitSettings(text="story")

    public = tmp_path / "public.txt"  # the guard's 256 tokens, and no more than that
    public.write_text(" ".join(f"word{i % 37} and item {i % 11} ." for i in range(30)))
    argv = ["emulate", str(model_dir), "--layout", "2-2-2", "--calib-data", str(public), "--calib-tokens", "256",
            "--no-progress", "--allow-far", "--select", "uniform", "--fit", "--fit-tokens", "512",
            "--fit-epochs", "1", "--fit-kl-epochs", "1"]
    assert main([*argv, "--out", str(tmp_path / "public")]) == 2  # 512 public tokens are not there
    assert "fewer --fit-tokens" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "self"), "--fit-text", "self"]) == 0
    fit = read_manifest(tmp_path / "self", BUNDLE_FORMAT).compression.fit
    assert fit.text == "self" and fit.sampled.tokens == 512 and fit.kl is not None
    assert fit.sampled.start_id == AutoTokenizer.from_pretrained(model_dir).bos_token_id
    assert "sampled 512 tokens of the model's own text" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sampler_sizes_its_batch_by_the_key_value_cache_it_really_holds(family, tiny_model_dir, monkeypatch):
    from offsite_ds import fitting
    from offsite_ds.families import kv_floats_per_token
    from offsite_ds.runtime import load_model

    model = load_model(tiny_model_dir(family))
    with torch.no_grad():
        cache = model(torch.ones(1, 7, dtype=torch.long), use_cache=True).past_key_values
    held = sum(t.numel() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 7 * kv_floats_per_token(model.config)
    batches = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda prompt, **kw: batches.append(len(prompt)) or generate(prompt, **kw))
    monkeypatch.setattr(fitting, "SAMPLE_KV_BYTES", 3 * 16 * kv_floats_per_token(model.config) * 4)
    fitting.self_text(model, 0, 100, 16)  # 7 sequences of 16 tokens, 3 at a time in fp32
    assert batches == [3, 3, 1]
    batches.clear()  # under bf16 autocast the cache still holds the fp32 weights' dtype: no more at a time
    fitting.self_text(model, 0, 100, 16, bf16=True)
    assert batches == [3, 3, 1]


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_a_perturbed_bottom_adapter_teaches_the_emulator_the_middles_answer_to_it(family, tiny_model_dir, tmp_path,
                                                                                 capsys):
    from offsite_ds.block_stream import StreamedBlocks, as_source, final_states, open_stream
    from offsite_ds.cli import main
    from offsite_ds.evaluate import head_kl
    from offsite_ds.families import backbone_and_head, logit_transform
    from offsite_ds.fitting import FitSettings, fit_kept_blocks, perturbed_states, relative_error, teacher_states
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.runtime import load_model
    from offsite_ds.validation import read_manifest

    model, text, ids = sharpened_model_and_text(tiny_model_dir(family))
    source = as_source(model)
    data = open_stream(source, ids, 64, 4)
    clean = teacher_states(source, data, [2, 5, 8])
    # no noise: exactly the full model's states; noise: only the bottom adapter's draw differs, seeded
    same = perturbed_states(source, data, 2, [2, 5, 8], 0.0, 0)
    assert all(torch.equal(a[b], c[b]) for a, c in zip(same, clean) for b in (2, 5, 8))
    noisy = perturbed_states(source, data, 2, [2, 8], 0.3, FitSettings().seed + 2)  # the KL phase's draws
    saved = as_source(load_model(tiny_model_dir(family)).eval())  # streamed from the shards = in memory
    saved_data = open_stream(saved, ids, 64, 4)
    loaded, streamed = (perturbed_states(src, saved_data, 2, [2, 8], 0.3, 0)
                        for src in (saved, StreamedBlocks(tiny_model_dir(family))))
    assert all(torch.allclose(a[b], c[b], atol=1e-5) for a, c in zip(loaded, streamed) for b in (2, 8))
    assert 0.001 < float(relative_error(noisy[0][2], clean[0][2])) < 1.0
    with pytest.raises(Exception, match="bottom 0"):
        perturbed_states(source, data, 0, [2], 0.3, 0)

    # block 2 is dropped: the first kept block is fitted from the bottom adapter's output, what the emulator feeds it
    block_map, kw = [0, 1, 3, 6, 7], dict(tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=3,
                                            kl_lr=3e-3)
    plain, report, _ = fit_kept_blocks(model, ids, block_map, 2, 2, FitSettings(**kw))
    states = teacher_states(source, data, [2, 6])
    layer = (lambda i: model.model.layers[i]) if family == "llama" else (lambda i: model.transformer.h[i])
    with torch.no_grad():
        first = sum(float(relative_error(data.run(layer(3), s[2], k, 3), s[6])) for k, s in enumerate(states))
    first /= len(states)
    assert report[0]["block"] == 3 and report[0]["before"] == pytest.approx(first, rel=1e-4)

    fitted, _, kl = fit_kept_blocks(model, ids, block_map, 2, 2, FitSettings(kl_perturb=0.3, **kw))
    assert kl["perturbed_after"] < kl["perturbed_before"] and kl["after"] < kl["before"], kl
    assert kl["perturb_shift"] == pytest.approx(
        sum(float(relative_error(n[2], c[2])) for n, c in zip(noisy, clean)) / len(clean), rel=1e-4)
    head, transform = backbone_and_head(model)[1], logit_transform(model.config)

    @torch.no_grad()
    def perturbed_kl(blocks: dict) -> float:  # the emulator fed the perturbed bottom adapter's output, vs the model
        total = 0.0
        for k, n in enumerate(noisy):
            h = n[2]
            for i in block_map[2:]:
                h = data.run(blocks.get(i, layer(i)), h, k, i)
            total += float(head_kl(final_states(source, data, k, h)[:, 1:], final_states(source, data, k, n[8])[:, 1:],
                                   head, transform))
        return total / len(noisy)

    assert kl["perturbed_after"] == pytest.approx(perturbed_kl(fitted), rel=1e-3)  # what it reports, re-measured
    assert perturbed_kl(fitted) < perturbed_kl(plain)  # trained on the perturbed views: closer there than without

    with pytest.raises(Exception, match="--fit-kl-perturb -1"):
        FitSettings(kl_perturb=-1)
    with pytest.raises(Exception, match="give --fit-kl-epochs >= 1"):
        FitSettings(kl_perturb=0.1, kl_epochs=0)
    with pytest.raises(Exception, match="give one of them"):
        FitSettings(kl_perturb=0.1, align=True)
    public = tmp_path / "public.txt"
    public.write_text(text)
    assert emulate_tiny(tiny_model_dir(family), public, tmp_path / "b", "--fit-kl-perturb", "0.2") == 0
    fit = read_manifest(tmp_path / "b", BUNDLE_FORMAT).compression.fit
    assert fit.kl_perturb == 0.2 and fit.kl.perturbed_after is not None and fit.kl.perturb_shift > 0
    capsys.readouterr()
    assert emulate_tiny(tiny_model_dir(family), public, tmp_path / "c", "--fit-kl-perturb", "0.2", fit=False) == 2
    err = capsys.readouterr().err  # with --no-fit it would change nothing: refused
    assert "--fit-kl-perturb" in err and "drop --no-fit" in err
    assert main(["emulate", str(tiny_model_dir(family)), "--layout", "0-2-2", "--calib-data", str(public),
                 "--no-progress", "--out", str(tmp_path / "d"), "--fit", "--fit-kl-perturb", "0.2"]) == 2
    err = capsys.readouterr().err.strip()  # no bottom adapter to perturb: refused before anything is built
    assert len(err.splitlines()) == 1 and "give L >= 1" in err and not (tmp_path / "d").exists()


def test_the_head_waits_in_bf16_only_where_that_is_exact_and_gives_the_same_logits():
    from offsite_ds.fitting import head_held_narrow

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    with torch.no_grad():
        head.weight.copy_(head.weight.to(torch.bfloat16).float())  # as streamed from a bf16 checkpoint
    original, x = head.weight.detach().clone(), torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = head(x)
        with head_held_narrow(head, True):
            assert head.weight.dtype == torch.bfloat16
            assert torch.equal(head(x), expected)  # autocast cast it so for every product anyway
    assert head.weight.dtype == torch.float32 and torch.equal(head.weight, original)  # back bit for bit
    with head_held_narrow(head, False):
        assert head.weight.dtype == torch.float32
    with torch.no_grad():
        head.weight.add_(1e-4)  # no longer exact in bf16: left alone
    with head_held_narrow(head, True):
        assert head.weight.dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_low_rank_kl_phase_holds_the_frozen_top_blocks_narrow_with_the_same_result(
        precision, tiny_model_dir, tmp_path, monkeypatch):
    """A bf16 owner streamed as emulate streams it: the top adapter blocks the KL phase runs through (frozen) wait in
    bf16 as the fitted ones do - the owner's peak memory - and the fitted blocks come out bit for bit as with
    those blocks in fp32. An in-memory model lends its own blocks: they come back fp32 and unpatched."""
    import contextlib

    import offsite_ds.fitting as fitting
    from offsite_ds.block_stream import StreamedBlocks
    from offsite_ds.families import blocks_of
    from offsite_ds.fitting import FitSettings, fit_kept_blocks
    from offsite_ds.runtime import load_model

    model, _, ids = sharpened_model_and_text(tiny_model_dir("llama"))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    block_map = [0, 1, 3, 6, 7]  # 1-3-1 of 8: block 7 is the frozen top adapter
    settings = FitSettings(tokens=1024, epochs=1, lr=1e-3, seq_len=64, batch_size=4, kl_epochs=2, kl_lr=3e-3,
                           kl_rank=2, precision=precision)
    held, narrow = [], fitting.frozen_held_narrow

    def spy(blocks, dtype):
        context = narrow(blocks, dtype)

        @contextlib.contextmanager
        def watched():
            with context:
                held.append({p.dtype for b in blocks for p in b.parameters() if p.dim() == 2})
                yield
        return watched()

    monkeypatch.setattr(fitting, "frozen_held_narrow", spy)
    narrow_run = fit_kept_blocks(StreamedBlocks(tmp_path / "bf16"), ids, block_map, 1, 3, settings,
                                 store_dtype=torch.bfloat16)
    assert held == [{torch.bfloat16}]
    monkeypatch.setattr(fitting, "frozen_held_narrow", lambda blocks, dtype: contextlib.nullcontext())
    fp32_run = fit_kept_blocks(StreamedBlocks(tmp_path / "bf16"), ids, block_map, 1, 3, settings,
                               store_dtype=torch.bfloat16)
    assert narrow_run[2] == fp32_run[2] and narrow_run[2]["after"] < narrow_run[2]["before"]
    for i, block in narrow_run[0].items():
        for (name, a), (_, b) in zip(block.state_dict().items(), fp32_run[0][i].state_dict().items()):
            assert torch.equal(a, b), (i, name)

    monkeypatch.setattr(fitting, "frozen_held_narrow", narrow)
    exact = load_model(tmp_path / "bf16").float()  # the in-memory source: bf16 values in fp32
    top = blocks_of(exact)[7].requires_grad_(False)  # as kl_finish freezes it
    before = {k: v.clone() for k, v in top.state_dict().items()}
    with narrow([top], torch.bfloat16):
        assert {p.dtype for p in top.parameters() if p.dim() == 2} == {torch.bfloat16}
    assert {k: v.dtype for k, v in top.state_dict().items()} == {k: v.dtype for k, v in before.items()}
    assert all(torch.equal(v, before[k]) for k, v in top.state_dict().items())
    assert not any("forward" in m.__dict__ for m in top.modules())
    with torch.no_grad():
        top.mlp.down_proj.weight.add_(1e-4)  # no longer exact in bf16: that matrix is left in fp32
    with narrow([top], torch.bfloat16):
        assert top.mlp.down_proj.weight.dtype == torch.float32 and top.mlp.up_proj.weight.dtype == torch.bfloat16


# each named budget against the fit recorded in the results folder that measured it (README, "Owner budgets")
BUDGET_RECORDS = {"mid": "2026-12-07-width-long-fit-smollm2-cpu/mid-importance_fit-offsite.json",
                  "half-hour": "2026-12-07-fit-budget-half-hour-smollm2-cpu/importance_fit-offsite.json",
                  "hour": "2026-12-07-hour-one-window-smollm2-cpu/importance_fit-offsite.json"}


@pytest.mark.parametrize("budget", sorted(BUDGET_RECORDS))
def test_a_named_budget_is_the_fit_that_was_measured(budget, monkeypatch):
    """`--fit-budget` names a measured point of the owner's cost curve: its settings are the ones recorded in that
    run's offsite.json (precision aside where it follows the device: bf16 wherever native)."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    import offsite_ds.fitting as fitting

    record = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / BUDGET_RECORDS[budget])
                        .read_text())["compression"]["fit"]
    settings = asdict(fitting.budget_settings(budget))
    assert {k: settings[k] for k in settings if k != "precision"} == \
        {k: record[k] for k in settings if k != "precision"}
    monkeypatch.setattr(fitting, "resolved_precision", lambda p, d, flag="--precision": "bf16" if p == "auto" else p)
    assert fitting.budget_settings(budget).precision == record["precision"]  # as it ran, on a CPU with native bf16
    assert fitting.budget_settings("default") == fitting.FitSettings()


def test_flags_set_their_field_over_the_budget_and_no_fit_refuses_a_budget(tiny_model_dir, tmp_path, capsys):
    from offsite_ds.cli import build_parser, main
    from offsite_ds.cli.train_args import fit_flags_given, fit_settings_from_args
    from offsite_ds.errors import OffsiteError
    from offsite_ds.fitting import KL_LR, budget_settings

    hour = budget_settings("hour")
    assert (hour.batch_size, hour.kl_rank, hour.kl_lr, hour.kl_epochs) == (1, 0, 3e-4, 5)
    assert budget_settings("hour", kl_epochs=2, lr=None).kl_epochs == 2  # None: the budget's
    assert budget_settings("hour", kl_rank=8).kl_lr == KL_LR[True]  # a rank given: the KL lr follows it
    with pytest.raises(OffsiteError, match="--fit-budget week must be one of default, mid, half-hour, hour"):
        budget_settings("week")

    def parse(*flags):
        return build_parser().parse_args(["emulate", "m", "--layout", "2-2-2", "--out", "x", *flags])

    args = parse("--fit-budget", "hour", "--fit-kl-epochs", "2")
    assert fit_settings_from_args(args) == budget_settings("hour", kl_epochs=2)
    assert fit_flags_given(args) == ["--fit-budget", "--fit-kl-epochs"]  # only what was given
    assert fit_flags_given(parse("--fit-budget", "hour")) == ["--fit-budget"]
    assert fit_flags_given(parse("--fit-budget", "hour", "--fit-batch-size", "4")) == ["--fit-budget",
                                                                                     "--fit-batch-size"]
    assert fit_settings_from_args(parse("--fit-budget", "hour", "--fit-batch-size", "4")).batch_size == 4
    assert fit_flags_given(parse("--fit-budget", "default")) == [] and fit_flags_given(parse()) == []
    # a budget where nothing is fitted: one line, nothing written
    assert main(["emulate", str(tiny_model_dir("opt")), "--layout", "2-2-2", "--out", str(tmp_path / "b"), "--no-fit",
                 "--fit-budget", "mid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fit-budget" in err and "--no-fit" in err
    assert not (tmp_path / "b").exists()
