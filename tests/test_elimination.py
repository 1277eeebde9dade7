"""Iterative block elimination (SLEB) and the fidelity knob (that each variant scores as running the model does:
tests/test_block_stream.py): the path never removes the middle's ends, and --max-ratio returns the fewest blocks that meet the target."""
import math

import pytest

from conftest import FAMILIES


@pytest.fixture(scope="module")
def public_ids():
    from offsite_ds.tiny import byte_tokenizer
    from offsite_ds.data import tokenize_corpus

    text = "a public corpus the owner may use . " * 30 + "numbers 1 2 3 and words . " * 20
    return tokenize_corpus([text], byte_tokenizer())[:400]


def _model(family, tiny_model_dir):
    from offsite_ds.runtime import load_model

    return load_model(tiny_model_dir(family)).eval()


def test_the_path_is_greedy_keeps_the_ends_and_its_ratios_are_the_emulators(tiny_model_dir, public_ids):
    from offsite_ds.calibrate import quality
    from offsite_ds.elimination import elimination_path, kept_after

    model = _model("llama", tiny_model_dir)
    middle = [2, 3, 4, 5]
    full, steps = elimination_path(model, public_ids, middle, 64, min_kept=2)
    assert len(steps) == 2 and {s.removed for s in steps} <= {3, 4} and math.isfinite(full)
    for k, step in zip((3, 2), steps):
        kept = kept_after(middle, steps, k)
        assert kept[0] == 2 and kept[-1] == 5 and len(kept) == k
        measured = quality(model, [0, 1, *kept, 6, 7], public_ids, 64, "")["ratio"]
        assert step.ratio == pytest.approx(measured, rel=1e-5)
    # greedy: the first removal is the cheaper of the two single drops
    single = {b: quality(model, [p for p in range(8) if p != b], public_ids, 64, "")["ratio"] for b in (3, 4)}
    assert steps[0].removed == min(single, key=lambda b: (single[b], b))
    with pytest.raises(Exception, match="K=1 needs"):
        kept_after(middle, steps, 1)


@pytest.mark.parametrize("select", ["iterative", "importance", "uniform"])
def test_max_ratio_keeps_the_fewest_blocks_that_meet_it(select, tiny_model_dir, public_ids):
    from offsite_ds.calibrate import quality
    from offsite_ds.emulator import choose_blocks
    from offsite_ds.errors import OffsiteError
    from offsite_ds.sandwich import Layout

    model = _model("gpt2", tiny_model_dir)
    whole = Layout.parse("1-*-1", 8, upper_bound=True)
    assert whole == Layout(1, 6, 1)
    ratios = {}
    for k in range(2, 7):
        _, bm, _, _ = choose_blocks(model, Layout(1, k, 1), select, calib_ids=public_ids, seq_len=64)
        ratios[k] = quality(model, bm, public_ids, 64, "")["ratio"]
    target = max(sorted(ratios.values())[2], 1.0)  # met by some K (the whole middle: 1.0), missed by others
    layout, bm, _, facts = choose_blocks(model, whole, select, calib_ids=public_ids, seq_len=64, max_ratio=target)
    assert quality(model, bm, public_ids, 64, "")["ratio"] <= target * (1 + 1e-6)
    assert len(bm) == layout.depth and layout.kept >= 2
    if layout.kept > 2 and select == "iterative":  # one more removal would have missed the target
        assert ratios[layout.kept - 1] > target
    with pytest.raises(OffsiteError, match="must be positive"):
        choose_blocks(model, whole, select, calib_ids=public_ids, seq_len=64, max_ratio=0.0)
    with pytest.raises(OffsiteError, match="max-ratio"):  # K at most 2, a target only the whole middle meets
        choose_blocks(model, Layout(1, 2, 1), select, calib_ids=public_ids, seq_len=64,
                      max_ratio=min(ratios.values()) * 0.5)


def test_emulate_max_ratio_records_the_target_and_the_chosen_k(tiny_model_dir, tmp_path):
    from offsite_ds.cli import main
    from offsite_ds.manifests import BUNDLE_FORMAT
    from offsite_ds.validation import read_manifest

    model = str(tiny_model_dir("opt"))
    assert main(["emulate", model, "--layout", "2-*-2", "--max-ratio", "1e6", "--select", "iterative",
                 "--calib-tokens", "256", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    m = read_manifest(tmp_path / "b", BUNDLE_FORMAT)
    assert m.compression.max_ratio == 1e6 and m.compression.kept == 2 and m.layout == "2-2-2"
    assert m.quality.ratio <= 1e6 and len(m.compression.elimination) == 2
    assert main(["emulate", model, "--layout", "2-*-2", "--out", str(tmp_path / "c")]) == 2  # no K, no target
