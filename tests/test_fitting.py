"""Fitting the kept blocks to their runs (offsite_ds.fitting): the fitted emulator is closer to the full model
on text it was fitted on and on held-out text, and the model itself is left untouched."""
import math

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
    fitted, report = fit_kept_blocks(model, fit_ids, block_map, 1, 3, FitSettings(tokens=2048, epochs=6, lr=3e-3,
                                                                             seq_len=64, batch_size=8))
    assert sorted(fitted) == [1, 3, 6] and [r["end"] for r in report] == [3, 6, 7]
    assert all(r["after"] < r["before"] for r in report), report
    with running_blocks(model, block_map, fitted):
        after = mean_nll(model, held, 64) - full
    assert math.isfinite(after) and after < before, (before, after)  # on text it never saw
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())  # the model is untouched
