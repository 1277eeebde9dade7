"""Layer merging instead of layer drop as the kept blocks' start (LaCo's RDSC, Yang et al. 2024): each kept middle
block of SmolLM2-135M's importance 2-8-2 emulator (kept 2, 6, 8, 11, 22, 23, 24, 27) becomes
    theta_k + alpha * sum_j (theta_j - theta_k)   over the dropped blocks j of its run,
for every tensor (MODE a number: alpha), only the MLP's or the attention's (mlpA, attnA), or the run's mean ("mean").
Prints the emulator/full perplexity ratio on 2,048 tokens of the public held-out text and of PTB valid, unfitted.

    python experiments/merge_init.py mean 0.1 0.25 0.5 1 mlp0.25 mlp1 attn0.25 attn1
"""
import copy, math, os, sys, torch
from transformers import AutoTokenizer
from offsite_ds import calibrate, demo_assets
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.runtime import load_model
from offsite_ds.surgery import running_blocks
md = demo_assets.smollm2_dir()
tok = AutoTokenizer.from_pretrained(md, local_files_only=True)
model = load_model(md).eval()
held = tokenize_corpus(load_texts(demo_assets.wikipedia_file("heldout")), tok)[:2048]
valid = tokenize_corpus(load_texts(demo_assets.penn_treebank_file("valid")), tok)[:2048]
kept = [2,6,8,11,22,23,24,27]
bm = [0, 1, *kept, 28, 29]
blocks = model.model.layers
full = {k: calibrate.mean_nll(model, v, 512) for k, v in (("held", held), ("valid", valid))}
def ratios(replace=None):
    with torch.no_grad(), running_blocks(model, bm, replace):
        return {k: round(math.exp(calibrate.mean_nll(model, v, 512) - full[k]), 2) for k, v in (("held", held), ("valid", valid))}
print("drop", ratios(), flush=True)
ends = kept[1:] + [28]
for mode in sys.argv[1:]:
    rep = {}
    for k, e in zip(kept, ends):
        run = list(range(k, e))
        b = copy.deepcopy(blocks[k])
        if len(run) > 1:
            sd = {n: p.detach().clone() for n, p in b.state_dict().items()}
            for n in sd:
                base = blocks[k].state_dict()[n]
                diffs = sum(blocks[j].state_dict()[n] - base for j in run[1:])
                if mode == "mean":
                    sd[n] = base + diffs / len(run)
                elif mode.startswith("mlp"):  # merge only mlp weights with alpha
                    a = float(mode[3:])
                    if ".mlp." in "." + n: sd[n] = base + a * diffs
                elif mode.startswith("attn"):
                    a = float(mode[4:])
                    if "self_attn" in n: sd[n] = base + a * diffs
                else:
                    a = float(mode)
                    sd[n] = base + a * diffs
            b.load_state_dict(sd)
        rep[k] = b
    print(mode, ratios(rep), flush=True)
