"""How far does a bottom adapter move its output? The relative error (fitting.relative_error) of the state leaving
SmolLM2-135M's bottom 2 blocks on 8,192 PTB valid tokens: for each plugged model given (a round trip's tuned
bottom blocks), and for the model with `--fit-kl-perturb`'s noise (fitting.noisy_copy) at each scale given - what
chose the scales the perturbation was measured at.

    python experiments/bottom_shift.py PLUGGED_DIR... -- SCALE...
"""
import json
import sys

import torch

from offsite_ds import demo_assets
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.fitting import noisy_copy, relative_error
from offsite_ds.plugin import load_model_dir

BOTTOM = 2
split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
plugged_dirs, scales = sys.argv[1:split], [float(s) for s in sys.argv[split + 1:]]
model, tok = load_model_dir(demo_assets.smollm2_dir())
ids = tokenize_corpus(load_texts(demo_assets.penn_treebank_file("valid")), tok)[:8192].view(-1, 512)


@torch.no_grad()
def leaving(m: torch.nn.Module) -> torch.Tensor:
    return m(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[BOTTOM]


base = leaving(model)
for d in plugged_dirs:
    print(json.dumps({"plugged": d, "shift": round(float(relative_error(leaving(load_model_dir(d)[0]), base)), 4)}))
g = torch.Generator().manual_seed(0)
original = [model.model.layers[i] for i in range(BOTTOM)]
for scale in scales:
    for i in range(BOTTOM):
        model.model.layers[i] = noisy_copy(original[i], scale, g)
    print(json.dumps({"noise": scale, "shift": round(float(relative_error(leaving(model), base)), 4)}), flush=True)
    for i in range(BOTTOM):
        model.model.layers[i] = original[i]
