"""Emulator builders: CKA, the selection rules on constructed inputs, and each builder on tiny models."""
import builtins
import io
import json
import math

import pytest
import torch

from conftest import FAMILIES
from offsite_ds.calibrate import (block_outputs, calibration_ids, calibration_seq_len, cka_matrix, linear_cka,
                                  mean_nll, quality)
from offsite_ds.emulator import AUTO_FIT
from offsite_ds.errors import LayoutError
from offsite_ds.fitting import FitSettings
from offsite_ds.sandwich import (Layout, block_map_for, merge_adjacent, select_crash, select_important,
                                 share_map_for)
from offsite_ds.surgery import running_blocks


def test_linear_cka_identity_invariances_and_unrelated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0, abs=1e-9)  # orthogonal + isotropic scaling
    assert linear_cka(x, torch.randn(256, 16, generator=g)) < 0.2
    stretched = x * torch.linspace(0.1, 10, 16)  # anisotropic scaling is NOT an invariance
    assert linear_cka(x, stretched) < 0.99
    m = cka_matrix(torch.stack([x, 2 * x, torch.randn(256, 16, generator=g)]))
    assert m[0][1] == pytest.approx(1.0) and m[0][2] == m[2][0] < 0.2 and m[2][2] == 1.0


def test_merge_order_on_a_constructed_matrix():
    s = [[1.0, 0.9, 0.1, 0.1, 0.1],
         [0.9, 1.0, 0.2, 0.1, 0.1],
         [0.1, 0.2, 1.0, 0.6, 0.7],
         [0.1, 0.1, 0.6, 1.0, 0.8],
         [0.1, 0.1, 0.7, 0.8, 1.0]]
    assert merge_adjacent(s, 5) == [[0], [1], [2], [3], [4]]
    assert merge_adjacent(s, 4) == [[0, 1], [2], [3], [4]]  # 0.9 first
    assert merge_adjacent(s, 3) == [[0, 1], [2], [3, 4]]  # then 0.8
    assert merge_adjacent(s, 2) == [[0, 1], [2, 3, 4]]  # [2]-[3,4] average 0.65 beats [0,1]-[2] 0.15
    assert merge_adjacent(s, 1) == [[0, 1, 2, 3, 4]]
    kept, clusters = select_crash([10, 11, 12, 13, 14], 2, s)
    assert clusters == [[10, 11], [12, 13, 14]]
    assert kept == [10, 14]  # the middle's first and last block
    run = [[1.0 if i == j else 0.1 for j in range(5)] for i in range(5)]
    for i, j in [(1, 2), (2, 3), (1, 3)]:
        run[i][j] = run[j][i] = 0.9
    assert select_crash([10, 11, 12, 13, 14], 3, run) == ([10, 13, 14], [[10], [11, 12, 13], [14]])  # a run's last


def test_ties_are_deterministic():
    ones = [[1.0] * 4 for _ in range(4)]
    assert merge_adjacent(ones, 2) == [[0, 1, 2], [3]]  # the leftmost pair merges on a tie
    assert select_crash([5, 6, 7, 8], 2, ones)[0] == [5, 8]
    assert select_important([5, 6, 7, 8, 9], 3, [0.0, 1.0, 1.0, 1.0, 0.0]) == [5, 6, 9]


def test_importance_keeps_ends_and_the_most_important():
    middle = [2, 3, 4, 5, 6, 7]
    assert select_important(middle, 4, [0.0, 5.0, 1.0, 9.0, 2.0, 0.0]) == [2, 3, 5, 7]
    assert select_important(middle, 1, [0.0] * 6) == [2]
    with pytest.raises(LayoutError):
        select_important(middle, 4, [1.0] * 5)


def test_maps():
    layout = Layout(2, 2, 1)
    assert block_map_for(9, layout, [3, 6]) == [0, 1, 3, 6, 8]
    assert share_map_for(9, layout, [[2, 3, 4], [5, 6, 7]]) == [0, 1, 2, 2, 2, 3, 3, 3, 4]
    with pytest.raises(LayoutError):
        block_map_for(9, layout, [6, 3])
    with pytest.raises(LayoutError):
        share_map_for(9, layout, [[2, 3], [5, 6, 7]])


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("public") / "public.txt"
    path.write_text("a public corpus the owner may use . " * 60 + "numbers 1 2 3 and words . " * 40)
    return path


def _load(family, tiny_model_dir):
    from offsite_ds.runtime import load_model

    model = load_model(tiny_model_dir(family))
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(tiny_model_dir(family))


def test_running_blocks_equals_a_built_emulator(tiny_model_dir, calib_file):
    from offsite_ds.emulator import build_emulator

    model, tok = _load("llama", tiny_model_dir)
    ids, _ = calibration_ids(calib_file, tok, 600)
    emulator, block_map = build_emulator(model, Layout(2, 2, 2))
    with running_blocks(model, block_map):
        virtual = mean_nll(model, ids, 64)
    assert virtual == pytest.approx(mean_nll(emulator, ids, 64), rel=1e-5)
    assert model.config.num_hidden_layers == 8 and len(model.model.layers) == 8  # restored
    whole = quality(model, list(range(8)), ids, 64, "fp")
    assert whole["ratio"] == 1.0 and whole["tokens"] == 600
    reps = block_outputs(model, ids, 64, sample_tokens=100)
    assert reps.shape == (9, 100, 32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("select,share", [("importance", False), ("crash", False), ("crash", True),
                                          ("iterative", False)])
def test_each_builder_makes_a_bundle(family, select, share, tiny_model_dir, calib_file, tmp_path):
    from offsite_ds.bundle import load_bundle
    from offsite_ds.emulator import make_bundle
    from offsite_ds.errors import OffsiteError

    with pytest.raises(OffsiteError, match="nothing written.*--allow-far"):  # guard 0.5x always trips
        make_bundle(tiny_model_dir(family), "2-2-2", tmp_path / "b", select=select, share=share,
                    calib_data=calib_file, calib_tokens=512, guard_ratio=0.5, fit=None)
    assert not (tmp_path / "b").exists()
    warnings = []
    out = make_bundle(tiny_model_dir(family), "2-2-2", tmp_path / "b", select=select, share=share,
                      calib_data=calib_file, calib_tokens=512, guard_ratio=0.5, log=warnings.append,
                      allow_far=True, fit=None).path  # the selection alone
    manifest = json.loads((out / "offsite.json").read_text())
    c = manifest["compression"]
    assert c["select"] == select and c["shared"] is share
    assert c["calibration"]["tokens"] == 512 and len(c["calibration"]["corpus_fingerprint"]) == 16
    if select == "iterative":  # 4 middle blocks, 2 kept: two removals, neither end of the middle
        assert [s["removed"] for s in c["elimination"]] and len(c["elimination"]) == 2
        assert {s["removed"] for s in c["elimination"]} <= {3, 4}
    else:
        assert len(c["scores"]) == (4 if select == "importance" else 3) and all(math.isfinite(x) for x in c["scores"])
    bm = manifest["block_map"]
    assert bm[:3] == [0, 1, 2] if select in ("importance", "iterative") else bm[:2] == [0, 1]
    assert len(bm) == 6 and bm == sorted(set(bm)) and bm[-2:] == [6, 7]
    q = manifest["quality"]
    assert q["ratio"] == pytest.approx(q["emulator_ppl"] / q["full_ppl"]) and q["tokens"] == 512
    assert warnings[0].startswith("continuing the stopped run kept in")  # the refused run's choice, not made again
    assert len(warnings) == 2 and "--max-ratio" in warnings[1] and "warning" in warnings[1]
    assert not (tmp_path / "b.checkpoints").exists()
    bundle = load_bundle(out)
    assert len(bundle.block_map) == (8 if share else 6)
    if share:
        assert manifest["share_map"][:2] == [0, 1] and manifest["share_map"][-2:] == [4, 5]
        assert bundle.adapter_positions == [0, 1, 6, 7]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_shared_bundle_loads_tunes_and_plugs_in(family, tiny_model_dir, calib_file, corpus_file, tmp_path):
    from offsite_ds.adapter_package import load_adapter_package
    from offsite_ds.bundle import load_bundle
    from offsite_ds.emulator import make_bundle
    from offsite_ds.families import blocks_of
    from offsite_ds.plugin import apply_to_emulator, plugin
    from offsite_ds.roles.tune_adapter import tune
    from offsite_ds.train import TrainConfig

    model_dir = tiny_model_dir(family)
    out = make_bundle(model_dir, "2-2-2", tmp_path / "b", select="crash", share=True, calib_data=calib_file,
                      calib_tokens=512, guard_ratio=1e9).path
    share_map = json.loads((out / "offsite.json").read_text())["share_map"]
    bundle = load_bundle(out)
    blocks = blocks_of(bundle.model)
    assert len(blocks) == 8
    for p, s in enumerate(share_map):  # repeated positions: own module, the stored block's parameters
        first = share_map.index(s)
        assert all(a is b for a, b in zip(blocks[p].parameters(), blocks[first].parameters()))
        assert p == first or blocks[p] is not blocks[first]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    cached = bundle.model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = bundle.model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached), "each executed position keeps its own KV-cache slot"

    tune(out, corpus_file, tmp_path / "a", cfg=TrainConfig(steps=3, lr=5e-3, batch_size=2, progress=False),
         seq_len=32)
    package = load_adapter_package(tmp_path / "a")
    prefix = "model.decoder.layers." if family == "opt" else "model.layers."
    assert {int(n[len(prefix):].split(".")[0]) for n in package.tensors} == {0, 1, 6, 7}
    tuned = apply_to_emulator(load_bundle(out), package)
    assert len(blocks_of(tuned)) == 8
    plugged = plugin(model_dir, tmp_path / "a", tmp_path / "p")
    assert (plugged / "config.json").is_file()


def test_calibration_never_reads_the_data_owners_file(tiny_model_dir, calib_file, corpus_file, tmp_path,
                                                      monkeypatch):
    from offsite_ds.emulator import make_bundle

    opened = []
    real_open = builtins.open

    def spy(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)  # pathlib reads through io.open
    make_bundle(tiny_model_dir("gpt2"), "2-2-2", tmp_path / "b", select="importance", calib_data=calib_file,
                calib_tokens=256, guard_ratio=1e9, fit=FitSettings(tokens=256, epochs=1, kl_epochs=1, seq_len=64))  # fit read too
    monkeypatch.undo()
    assert str(calib_file) in opened
    assert str(corpus_file) not in opened and not any("train.txt" in p for p in opened)
    assert json.loads((tmp_path / "b" / "offsite.json").read_text())["compression"]["fit"]["tokens"] == 256


def test_emulate_cli_builders_guard_and_errors(tiny_model_dir, calib_file, tmp_path, capsys):
    from offsite_ds.cli import main

    model_dir = str(tiny_model_dir("opt"))
    argv = ["emulate", model_dir, "--layout", "2-2-2", "--out", str(tmp_path / "b"), "--select", "crash",
            "--share", "--calib-data", str(calib_file), "--calib-tokens", "256", "--guard-ratio", "0.9", "--no-progress"]
    assert main(argv) == 2  # beyond the guard: refused in one line, nothing written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-ratio" in err and "--allow-far" in err
    assert not (tmp_path / "b").exists()
    assert main([*argv, "--allow-far"]) == 0
    out, err = capsys.readouterr()
    assert "shared over 8 positions" in out and "calibration tokens" in out
    assert err.count("warning:") == 1 and "distil" in err
    assert main(["emulate", model_dir, "--layout", "2-2-2", "--out", str(tmp_path / "c"), "--select",
                 "importance", "--no-calib"]) == 2
    err = capsys.readouterr().err
    assert "--calib-data" in err and "--no-calib" in err and len(err.strip().splitlines()) == 1
    assert main(["emulate", model_dir, "--layout", "2-2-2", "--out", str(tmp_path / "c"), "--share"]) == 2
    assert "--select crash" in capsys.readouterr().err


def test_emulate_default_keeps_important_blocks_scored_on_the_public_sample(tiny_model_dir, tmp_path, capsys):
    """Without options `emulate` is the measured default: importance on the public sample shipped in the package
    (no gensim needed), with the guard."""
    from offsite_ds.cli import main
    from offsite_ds.data import corpus_fingerprint, load_texts
    from offsite_ds.demo_assets import public_sample_file, wikipedia_file
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.validation import read_manifest

    model_dir = str(tiny_model_dir("llama"))
    assert main(["emulate", model_dir, "--layout", "2-2-2", "--out", str(tmp_path / "b"), "--calib-tokens", "256",
                 "--no-progress"]) == 0
    m = read_manifest(tmp_path / "b", BUNDLE_FORMAT)
    assert m.compression.select == "importance" and m.quality is not None and m.quality.tokens == 256
    public = corpus_fingerprint(load_texts(public_sample_file("train")))
    assert m.compression.calibration.corpus_fingerprint == m.quality.corpus_fingerprint == public
    # the shipped sample is the start of the full public corpus: the measured defaults keep their meaning
    sample = public_sample_file("train").read_text().splitlines()
    assert sample == wikipedia_file("train").read_text().splitlines()[:len(sample)]
    assert "zero-shot perplexity on 256 calibration tokens" in capsys.readouterr().out
    # --no-calib: the paper's uniform drop, streamed (the model is never loaded), no guard
    assert main(["emulate", model_dir, "--layout", "2-2-2", "--out", str(tmp_path / "u"), "--select", "uniform",
                 "--no-calib"]) == 0
    u = read_manifest(tmp_path / "u", BUNDLE_FORMAT)
    assert u.compression.select == "uniform" and u.quality is None and u.compression.calibration is None


def test_compare_emulators_end_to_end_and_resume(tiny_model_dir, calib_file, corpus_file, tmp_path, monkeypatch):
    from offsite_ds import compare
    from offsite_ds.cli import main

    model_dir = tiny_model_dir("gpt2")
    valid = tmp_path / "valid.txt"
    valid.write_text(corpus_file.read_text()[:2000])
    argv = ["compare-emulators", "--model", str(model_dir), "--calib-data", str(calib_file), "--train",
            str(corpus_file), "--valid", str(valid), "--test", str(valid), "--out", str(tmp_path / "cmp"),
            "--layout", "2-2-2", "--builders", "uniform,crash+share,importance+distill", "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-seq-len", "32", "--eval-tokens", "256",
            "--eval-every", "0", "--calib-tokens", "256", "--distill-steps", "2", "--kd-norm", "token",
            "--logit-weight", "0.5", "--ft", "--no-progress"]
    assert main(argv) == 0
    report = __import__("json").loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = report["tables"]["test"]
    assert [r["builder"] for r in rows] == ["uniform", "crash+share", "importance+distill", "ceiling"]
    for r in rows:
        assert r["privacy gap"] == pytest.approx(r["OT Emulator"] - r["OT Plug-in"])
        assert r["tuning gain"] == pytest.approx(r["Full zero-shot"] - r["OT Plug-in"])
        assert r["FT"] == report["ft"]["ppl"]["test"] and r["owner s"] > 0 and r["data owner s"] > 0
    by = {r["builder"]: r for r in rows}
    assert by["ceiling"]["Emulator zero-shot"] == pytest.approx(by["ceiling"]["Full zero-shot"])
    assert by["ceiling"]["emulator params"] > by["uniform"]["emulator params"] == by["crash+share"]["emulator params"]
    assert by["crash+share"]["tune FLOPs/token"] > by["uniform"]["tune FLOPs/token"]  # shared: full depth runs
    distilled = report["results"][2]
    assert distilled["timings"]["distill_s"] > 0
    manifest = json.loads((tmp_path / "cmp" / "importance_distill" / "distilled" / "offsite.json").read_text())
    record = manifest["compression"]["distillation"]
    assert (record["kd_norm"], record["logit_weight"]) == ("token", 0.5) and record["final_logit_kl"] >= 0
    md = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    table = [line for line in md if line.startswith("| ")]
    assert len(table) == 2 * (2 + 4) and all(line.count("|") == table[0].count("|") for line in table)
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"

    def boom(*a, **kw):
        raise AssertionError("a finished builder ran again")

    monkeypatch.setattr(compare, "run_builder", boom)
    monkeypatch.setattr(compare, "run_ft", boom)
    assert main(argv) == 0  # resumed: every builder's result.json is reused
    assert main(argv[:-1] + ["--builders", "crash+share+distill", "--no-progress"]) == 2


def test_plugin_check_warns_when_the_plug_in_got_worse(tiny_model_dir, tiny_bundle, corpus_file, tmp_path, capsys):
    import random

    from offsite_ds.cli import main
    from offsite_ds.roles.tune_adapter import tune
    from offsite_ds.train import TrainConfig

    model_dir = tiny_model_dir("opt")
    bundle = tiny_bundle("opt")
    tune(bundle, corpus_file, tmp_path / "a", cfg=TrainConfig(steps=8, lr=2e-2, batch_size=2, progress=False),
         seq_len=32)
    # owner text of uniformly random characters: the untrained model is near its best there, an adapter
    # that learned English concentrates probability elsewhere, so the plug-in scores worse than zero-shot
    noise = tmp_path / "noise.txt"
    noise.write_text("".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(600)))
    assert main(["plugin", str(model_dir), str(tmp_path / "a"), "--out", str(tmp_path / "p"), "--check-data",
                 str(noise), "--check-tokens", "256"]) == 0
    out, err = capsys.readouterr()
    check = json.loads((tmp_path / "p" / "offsite.json").read_text())["check"]
    assert check["tokens"] == 256 and check["plugged_ppl"] > check["full_ppl"]
    assert f"plug-in {check['plugged_ppl']:.2f}, full model {check['full_ppl']:.2f}" in out
    assert err.count("warning:") == 1 and "worse than the full model's zero-shot" in err
    assert main(["plugin", str(model_dir), str(tmp_path / "a"), "--out", str(tmp_path / "p2"), "--check-data",
                 str(corpus_file), "--check-tokens", "256"]) == 0
    assert "warning" not in capsys.readouterr().err  # on text like the tuning data it improved: no warning


def test_guard_scores_the_compressed_middle(tiny_model_dir, calib_file, tmp_path):
    from offsite_ds.bundle import load_bundle
    from offsite_ds.emulator import make_bundle

    ratios = {}
    for method in ("drop", "quantize"):  # the fitted emulator too (the default leaves a quantized one unfitted)
        fit = FitSettings(tokens=256, epochs=1, kl_epochs=1, seq_len=64) if method == "drop" else AUTO_FIT
        out = make_bundle(tiny_model_dir("bloom"), "2-2-2", tmp_path / method, method=method, quant_bits=2,
                          calib_data=calib_file, calib_tokens=256, guard_ratio=1e9, select="uniform", fit=fit).path
        assert (json.loads((out / "offsite.json").read_text())["compression"].get("fit") is None) == (method != "drop")
        q = json.loads((out / "offsite.json").read_text())["quality"]
        bundle = load_bundle(out)  # the guard's figure is the shipped emulator's perplexity
        ids, _ = calibration_ids(calib_file, bundle.tokenizer, 256)
        seq_len = calibration_seq_len(bundle.model)
        assert q["emulator_ppl"] == pytest.approx(math.exp(mean_nll(bundle.model, ids, seq_len)), rel=1e-4)
        ratios[method] = q["ratio"]
    assert ratios["drop"] != ratios["quantize"]


def test_representations_skip_each_windows_first_token(tiny_model_dir, calib_file):
    model, tok = _load("opt", tiny_model_dir)
    ids, _ = calibration_ids(calib_file, tok, 130)
    reps = block_outputs(model, ids, 64, sample_tokens=10_000)  # more than there are: every candidate
    assert reps.shape[1] == 130 - 3  # windows of 64, 64, 2 tokens: their first tokens are left out
    captured = []
    handle = model.model.decoder.layers[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    model(input_ids=ids[:64].unsqueeze(0))
    handle.remove()
    torch.testing.assert_close(reps[0, :63], captured[0][0, 1:])


def test_compare_emulators_frontier_over_layouts_and_adapter_sizes(tiny_model_dir, calib_file, corpus_file, tmp_path):
    """Several layouts: every builder at each, one ceiling per adapter size, and the frontier plot."""
    from offsite_ds.cli import main

    valid = tmp_path / "valid.txt"
    valid.write_text(corpus_file.read_text()[:2000])
    argv = ["compare-emulators", "--model", str(tiny_model_dir("llama")), "--calib-data", str(calib_file),
            "--train", str(corpus_file), "--valid", str(valid), "--test", str(valid), "--out", str(tmp_path / "f"),
            "--layout", "2-2-2,1-3-1", "--builders", "importance,iterative+fit", "--steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--eval-seq-len", "32", "--eval-tokens", "256", "--eval-every", "0",
            "--calib-tokens", "256", "--fit-tokens", "512", "--fit-epochs", "1", "--mlp-width", "0.5", "--no-progress",
            "--fit-budget", "mid", "--fit-kl-tokens", "512"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "f" / "compare.json").read_text())
    # the record names the budget that ran, and its settings with the flags given over it
    assert report["settings"]["fit_budget"] == "mid" and report["settings"]["fit"]["kl_tokens"] == 512
    rows = report["tables"]["valid"]
    assert [(r["builder"], r["layout"]) for r in rows] == [
        ("importance", "2-2-2"), ("iterative+fit", "2-2-2"), ("importance", "1-3-1"), ("iterative+fit", "1-3-1"),
        ("ceiling 2+2", "2-4-2"), ("ceiling 1+1", "1-6-1")]
    for r in rows[:4]:
        assert r["public ratio"] > 0 and r["emulator params"] > 0 and r["owner s"] > 0
    assert rows[4]["Emulator zero-shot"] == pytest.approx(rows[4]["Full zero-shot"])
    assert (tmp_path / "f" / "frontier.png").stat().st_size > 1000
    assert (tmp_path / "f" / "2-2-2_iterative_fit" / "result.json").is_file()
    manifest = json.loads((tmp_path / "f" / "1-3-1_iterative_fit" / "bundle" / "offsite.json").read_text())
    assert manifest["compression"]["fit"]["tokens"] == 512 and len(manifest["compression"]["fit"]["blocks"]) == 3
    width = manifest["compression"]["mlp_width"]  # --mlp-width reaches every builder, never the ceiling
    assert width["width"] < width["full_width"] and width["fraction"] == 0.5
    for name, narrowed in (("1-3-1_importance", True), ("ceiling_2_2", False)):
        record = json.loads((tmp_path / "f" / name / "bundle" / "offsite.json").read_text())["compression"]
        assert record.get("mlp_width") == (width if narrowed else None)

def test_fit_flags_without_a_fitting_builder_are_refused(tiny_model_dir, calib_file, corpus_file, tmp_path, capsys):
    """--fit-* flags where nothing is fitted would change nothing: one line, exit 2, nothing written."""
    from offsite_ds.cli import main

    model_dir = str(tiny_model_dir("opt"))
    assert main(["emulate", model_dir, "--layout", "2-2-2", "--out", str(tmp_path / "b"), "--calib-data",
                 str(calib_file), "--fit-kl-rank", "0", "--fit-tokens", "1024", "--no-fit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fit-tokens --fit-kl-rank" in err and "drop --no-fit" in err
    assert main(["compare-emulators", "--model", model_dir, "--calib-data", str(calib_file), "--train",
                 str(corpus_file), "--valid", str(corpus_file), "--test", str(corpus_file), "--builders",
                 "uniform,importance", "--fit-align", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fit-align" in err and "importance+fit" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # --mlp-width that a later builder cannot take is refused before the first builder runs
    assert main(["compare-emulators", "--model", model_dir, "--calib-data", str(calib_file), "--train",
                 str(corpus_file), "--valid", str(corpus_file), "--test", str(corpus_file), "--builders",
                 "importance,crash+share", "--layout", "2-2-2", "--mlp-width", "0.5",
                 "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--mlp-width" in err and "--share" in err
    assert main(["compare-emulators", "--model", model_dir, "--calib-data", str(calib_file), "--train",
                 str(corpus_file), "--valid", str(corpus_file), "--test", str(corpus_file), "--builders",
                 "importance", "--layout", "2-2-2", "--mlp-width", "1.5", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--mlp-width 1.5" in err and "0 < F <= 1" in err
    assert not (tmp_path / "w").exists()
    # a value equal to the default is not "given": the flag is harmless and accepted
    from offsite_ds.cli.train_args import fit_flags_given
    from offsite_ds.cli import build_parser

    args = build_parser().parse_args(["emulate", model_dir, "--layout", "2-2-2", "--out", "x", "--fit-epochs", "4"])
    assert fit_flags_given(args) == []


def test_the_default_fits_wherever_a_fit_can_run(monkeypatch, tmp_path):
    """`make_bundle(fit=AUTO_FIT)` (emulate's default): FitSettings() with calibration text, plain layer-drop and no
    sharing, nothing elsewhere; a fit asked for where it cannot run is refused. The CLI passes AUTO_FIT without
    fit flags, the settings with --fit or any --fit-* flag, None with --no-fit."""
    import inspect

    from offsite_ds import emulator
    from offsite_ds.cli import main
    from offsite_ds.errors import OffsiteError

    assert inspect.signature(emulator.make_bundle).parameters["fit"].default == AUTO_FIT
    public = tmp_path / "public.txt"
    assert emulator.resolved_fit(AUTO_FIT, public, "drop", False) == FitSettings()
    for calib, method, share in ((None, "drop", False), (public, "prune", False), (public, "quantize", False),
                                 (public, "drop", True)):
        assert emulator.resolved_fit(AUTO_FIT, calib, method, share) is None
        with pytest.raises(OffsiteError, match="--fit trains the kept blocks"):
            emulator.resolved_fit(FitSettings(), calib, method, share)
    assert emulator.resolved_fit(None, public, "drop", False) is None

    seen = []

    def fake(*_args, fit, **_kw):
        seen.append(fit)
        raise OffsiteError("stop here")

    monkeypatch.setattr(emulator, "make_bundle", fake)
    argv = ["emulate", "m", "--layout", "2-2-2", "--out", str(tmp_path / "b"), "--no-progress"]
    for flags in ([], ["--fit"], ["--fit-epochs", "2"], ["--no-fit"]):
        assert main([*argv, *flags]) == 2
    assert seen == [AUTO_FIT, FitSettings(), FitSettings(epochs=2), None]


def test_the_default_fit_on_short_public_text_fits_on_what_there_is(tiny_model_dir, tmp_path):
    """The default fit (not one asked for) reads 16,384 public tokens after the calibration tokens; an owner's
    shorter text is fitted on all it holds, down to one batch, and below that the blocks stay unfitted - one line
    each, the manifest saying what ran. A fit asked for keeps its refusal."""
    from transformers import AutoTokenizer

    from offsite_ds.emulator import make_bundle
    from offsite_ds.errors import OffsiteError

    model_dir = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    least = FitSettings().batch_size * FitSettings().seq_len
    for name, repeats in (("short", 120), ("shorter", 20)):
        public = tmp_path / f"{name}.txt"
        public.write_text("a public corpus the owner may use . " * repeats)
        available = calibration_ids(public, tokenizer, 10**6)[0].numel() - 256
        assert (available >= least) == (name == "short")  # one text above one batch, one below
        lines = []
        out = make_bundle(model_dir, "2-2-2", tmp_path / name, calib_data=public, calib_tokens=256, allow_far=True,
                          log=lines.append).path
        fit = json.loads((out / "offsite.json").read_text())["compression"].get("fit")
        if name == "short":
            assert fit["tokens"] == available and fit["kl"]["after"] >= 0
            assert [line for line in lines if line.startswith("fit:")] and f"holds {available} tokens" in lines[0]
        else:
            assert fit is None and any(line.startswith("not fitted:") and "--no-fit" in line for line in lines)
        with pytest.raises(OffsiteError, match="fewer --fit-tokens, or --no-fit"):
            make_bundle(model_dir, "2-2-2", tmp_path / f"{name}-asked", calib_data=public, calib_tokens=256,
                        allow_far=True, fit=FitSettings())
