"""The learning-rate sweep that chose `FitSettings.lr` (emulate --fit): SmolLM2-135M, the importance 2-8-2 emulator
(kept middle blocks 2, 6, 8, 11, 22, 23, 24, 27), fitted on the public Wikipedia train text after the first 1,024
(calibration) tokens; emulator/full perplexity ratio on 2,048 tokens of the public held-out split and of PTB valid.

    python experiments/fit_lr_sweep.py TOKENS EPOCHS LR [KL_EPOCHS KL_LR [KL_TOKENS [KL_RANK]]]  # e.g. 16384 4 3e-4 2 1e-4
                                                     # prints before/after ratios (KL_EPOCHS: --fit-kl-epochs)
    KEPT=2,8,10,11,21,23,24,27 python experiments/fit_lr_sweep.py ...   # other kept middle blocks (here: iterative's)
    PRECISION=fp32 python experiments/fit_lr_sweep.py ...   # --fit-precision (default auto)
    BATCH=4 python experiments/fit_lr_sweep.py ...   # windows of 512 tokens a step (default FitSettings.batch_size)
"""
import math
import os
import sys
import time

from transformers import AutoTokenizer

from offsite_ds import calibrate, demo_assets
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.fitting import FitSettings, fit_kept_blocks
from offsite_ds.runtime import load_model
from offsite_ds.surgery import running_blocks

tokens, epochs, lr = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
kl_epochs, kl_lr = (int(sys.argv[4]), float(sys.argv[5])) if len(sys.argv) > 5 else (0, 1e-4)
kl_tokens = int(sys.argv[6]) if len(sys.argv) > 6 else 0
kl_rank = int(sys.argv[7]) if len(sys.argv) > 7 else 0
md = demo_assets.smollm2_dir()
tok = AutoTokenizer.from_pretrained(md, local_files_only=True)
model = load_model(md).eval()
train = tokenize_corpus(load_texts(demo_assets.wikipedia_file("train")), tok)
held = tokenize_corpus(load_texts(demo_assets.wikipedia_file("heldout")), tok)[:2048]
valid = tokenize_corpus(load_texts(demo_assets.penn_treebank_file("valid")), tok)[:2048]
kept = [int(b) for b in os.environ.get("KEPT", "2,6,8,11,22,23,24,27").split(",")]
bm = [0, 1, *kept, 28, 29]
full = {k: calibrate.mean_nll(model, v, 512) for k, v in (("held", held), ("valid", valid))}


def ratios(replace=None):
    with running_blocks(model, bm, replace):
        return {k: round(math.exp(calibrate.mean_nll(model, v, 512) - full[k]), 2)
                for k, v in (("held", held), ("valid", valid))}


print("before", ratios(), flush=True)
t, w = time.process_time(), time.time()
fitted, _, _ = fit_kept_blocks(model, train[1024:], bm, 2, 8, FitSettings(tokens=tokens, epochs=epochs, lr=lr, kl_epochs=kl_epochs, kl_lr=kl_lr, kl_tokens=kl_tokens, kl_rank=kl_rank, precision=os.environ.get("PRECISION", "auto"), batch_size=int(os.environ.get("BATCH", FitSettings.batch_size))), log=print, progress=True)
print("fit cpu s", time.process_time() - t, "wall s", time.time() - w, flush=True)
print("after", ratios(fitted), flush=True)
