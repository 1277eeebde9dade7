"""Zero-shot perplexity of an EmulatorBundle on the same tokens as block_study.py (first 4,096 tokens of PTB valid
and of the public held-out text, windows of 512), so distilled and undistilled emulators compare directly.

    python experiments/emulator_study/eval_bundle.py BUNDLE_DIR OUT.json
"""
import json
import math
import sys
import time

import torch

from offsite_ds import demo_assets
from offsite_ds.bundle import load_bundle
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.evaluate import token_nll

EVAL_TOKENS, SEQ = 4096, 512
FULL = {"ptb_valid": 64.82, "pub_heldout": 35.56}  # block_study.json "full" on the same tokens

torch.set_num_threads(2)
bundle = load_bundle(sys.argv[1])
bundle.model.config.use_cache = False
files = {"ptb_valid": demo_assets.penn_treebank_file("valid"), "pub_heldout": demo_assets.wikipedia_file("heldout")}
result = {"bundle": sys.argv[1], "eval_tokens": EVAL_TOKENS, "seq": SEQ,
          "distillation": {k: v for k, v in bundle.manifest["compression"].get("distillation", {}).items()
                           if k != "loss_history"}}
for name, path in files.items():
    ids = tokenize_corpus(load_texts(path), bundle.tokenizer)[:EVAL_TOKENS]
    t = time.perf_counter()
    nll, n = token_nll(bundle.model, ids, SEQ)
    result[name] = math.exp(nll / n)
    result[f"{name}_ratio"] = result[name] / FULL[name]
    result[f"{name}_s"] = time.perf_counter() - t
    print(name, round(result[name], 2), f"x{result[name + '_ratio']:.2f}", flush=True)
with open(sys.argv[2], "w") as f:
    json.dump(result, f, indent=1)
