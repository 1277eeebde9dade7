"""Does the emulator keep the adapter's gradients (GradOT, Yao et al., ACL 2025)? SmolLM2-135M at 2-8-2: the
gradient of the mean next-token NLL w.r.t. the four adapter blocks' weights through the full model and through
each emulator, on the owner's public text (Wikipedia train, after the calibration tokens) and on the data
owner's (PTB train: a diagnostic only, never what the owner can read). Prints per emulator the public/PTB
perplexity ratio, the gradients' cosine (all adapter weights, and per block) and the norm ratio.

    python experiments/adapter_gradients.py [TOKENS]   # default 4096 tokens of each text, windows of 512

"noise" is the cosine between the full model's gradients on the first and the second half of the tokens: what
two samples of the same gradient agree to (the emulators are compared with the full model on the same tokens).
    FIT=1 python experiments/adapter_gradients.py       # also importance + emulate --fit's default fit
    BUNDLES=a/bundle,b/bundle python experiments/adapter_gradients.py   # also these bundles' kept middle blocks
    SELECTIONS=0 BUNDLES=... python experiments/adapter_gradients.py    # the bundles alone
"""
import json
import math
import os
import sys

import torch
from transformers import AutoTokenizer

from offsite_ds import calibrate, demo_assets
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.fitting import FitSettings, fit_kept_blocks
from offsite_ds.runtime import load_model
from offsite_ds.sandwich import select_kept
from offsite_ds.surgery import running_blocks

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
SEQ = 512
md = demo_assets.smollm2_dir()
tok = AutoTokenizer.from_pretrained(md, local_files_only=True)
model = load_model(md).eval()
wiki = tokenize_corpus(load_texts(demo_assets.wikipedia_file("train")), tok)
texts = {"public": wiki[1024:1024 + tokens],
         "ptb": tokenize_corpus(load_texts(demo_assets.penn_treebank_file("train")), tok)[:tokens]}
blocks = model.model.layers
depth = len(blocks)
adapter = [0, 1, depth - 2, depth - 1]
middle = list(range(2, depth - 2))
emulators = {
    "full": (list(range(depth)), None),
    "uniform": ([0, 1, *select_kept(middle, 8), 28, 29], None),
    "importance": ([0, 1, 2, 6, 8, 11, 22, 23, 24, 27, 28, 29], None),  # SmolLM2-135M's kept blocks
    "iterative": ([0, 1, 2, 8, 10, 11, 21, 23, 24, 27, 28, 29], None),
}
params = {i: [p for p in blocks[i].parameters()] for i in adapter}


def only_adapter_trainable():
    """Gradients for the adapter blocks' weights alone (what the data owner tunes)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for i in adapter:
        for p in params[i]:
            p.requires_grad_(True)


only_adapter_trainable()


def grads(bm, replace, ids):
    """Per adapter block, the flattened gradient of the mean NLL over `ids`' windows."""
    model.zero_grad(set_to_none=True)
    n = ids.numel() // SEQ
    with running_blocks(model, bm, replace):
        for k in range(0, n, 4):
            batch = ids[k * SEQ:min(n, k + 4) * SEQ].view(-1, SEQ)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss * batch.shape[0] / n
            loss.backward()
    return {i: torch.cat([p.grad.flatten() for p in params[i]]).clone() for i in adapter}


def nll(bm, replace, ids):
    with running_blocks(model, bm, replace), torch.no_grad():
        return calibrate.mean_nll(model, ids, SEQ)


if os.environ.get("FIT"):
    bm = emulators["importance"][0]
    fitted, _, _ = fit_kept_blocks(model, wiki[1024:], bm, 2, 8, FitSettings(), progress=True)
    only_adapter_trainable()  # the fit sets requires_grad flags of its own while it trains
    emulators["importance+fit"] = (bm, fitted)


def cos(a, b):
    return round(float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0)), 4)


if os.environ.get("SELECTIONS") == "0":
    emulators = {"full": emulators["full"]}
for directory in filter(None, os.environ.get("BUNDLES", "").split(",")):
    from offsite_ds.bundle import load_bundle

    bundle = load_bundle(directory)
    bm, layers = bundle.block_map, bundle.model.model.layers
    emulators[directory] = (bm, {bm[j]: layers[j] for j in range(2, len(bm) - 2)})

reference = {name: grads(*emulators["full"], ids) for name, ids in texts.items()}
for name, ids in texts.items():
    half = (ids.numel() // SEQ // 2) * SEQ
    a, b = grads(*emulators["full"], ids[:half]), grads(*emulators["full"], ids[half:])
    print(json.dumps({"noise": name, "cos": cos(torch.cat([a[i] for i in adapter]), torch.cat([b[i] for i in adapter])),
                      "cos_blocks": [cos(a[i], b[i]) for i in adapter]}), flush=True)
full_nll = {name: nll(*emulators["full"], ids) for name, ids in texts.items()}
for em, (bm, replace) in list(emulators.items())[1:]:
    row = {"emulator": em}
    for name, ids in texts.items():
        g = grads(bm, replace, ids)
        a = torch.cat([reference[name][i] for i in adapter])
        b = torch.cat([g[i] for i in adapter])
        row[name] = {"ratio": round(math.exp(nll(bm, replace, ids) - full_nll[name]), 2),
                     "cos": cos(a, b), "cos_blocks": [cos(reference[name][i], g[i]) for i in adapter],
                     "sign_agree": round(float((a.sign() == b.sign()).float().mean()), 4),
                     "norm_ratio": round(float(b.norm() / a.norm()), 3)}
    print(json.dumps(row), flush=True)
