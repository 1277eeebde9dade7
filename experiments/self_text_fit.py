"""Does the owner's model's own text make a closer emulator than the public Wikipedia sample? SmolLM2-135M, the
importance 2-8-2 emulator (as fit_lr_sweep.py); the fit reads either the Wikipedia train text (after the first
1,024 calibration tokens) or text sampled from the full model itself (temperature 1, from the tokenizer's BOS).

    TEXT=self|wiki|mix python experiments/self_text_fit.py TOKENS EPOCHS LR KL_EPOCHS KL_LR [KL_TOKENS [KL_RANK]]
    GEN=path.pt caches the sampled ids (made once, reused)
"""
import math
import os
import sys
import time

import torch
from transformers import AutoTokenizer

from offsite_ds import calibrate, demo_assets
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.fitting import FitSettings, fit_kept_blocks
from offsite_ds.runtime import load_model
from offsite_ds.surgery import running_blocks

tokens, epochs, lr, kl_epochs, kl_lr = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
kl_tokens = int(sys.argv[6]) if len(sys.argv) > 6 else 0
kl_rank = int(sys.argv[7]) if len(sys.argv) > 7 else 0
text = os.environ.get("TEXT", "self")
md = demo_assets.smollm2_dir()
tok = AutoTokenizer.from_pretrained(md, local_files_only=True)
model = load_model(md).eval()
train = tokenize_corpus(load_texts(demo_assets.wikipedia_file("train")), tok)
held = tokenize_corpus(load_texts(demo_assets.wikipedia_file("heldout")), tok)[:2048]
valid = tokenize_corpus(load_texts(demo_assets.penn_treebank_file("valid")), tok)[:2048]
kept = [int(b) for b in os.environ.get("KEPT", "2,6,8,11,22,23,24,27").split(",")]
bm = [0, 1, *kept, 28, 29]
full = {k: calibrate.mean_nll(model, v, 512) for k, v in (("held", held), ("valid", valid))}
need = max(tokens, kl_tokens)


@torch.no_grad()
def sample(n: int, seq_len: int = 512, batch: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = []
    while sum(r.numel() for r in rows) < n:
        ids = torch.full((batch, 1), start)
        past = None
        for _ in range(seq_len - 1):
            out = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1, generator=g)
            ids = torch.cat([ids, nxt], 1)
        rows.append(ids.reshape(-1))
        print("sampled", sum(r.numel() for r in rows), flush=True)
    return torch.cat(rows)[:n]


t0 = time.time()
if text == "wiki":
    ids = train[1024:1024 + need]
else:
    path = os.environ.get("GEN", "/tmp/exp/self_ids.pt")
    gen = torch.load(path) if os.path.exists(path) else None
    if gen is None or gen.numel() < need:
        gen = sample(need)
        torch.save(gen, path)
    ids = gen[:need]
    if text == "mix":  # half and half, interleaved per 512-token window
        w = train[1024:1024 + need].reshape(-1, 512)[: need // 1024]
        s = ids.reshape(-1, 512)[: need // 1024]
        ids = torch.stack([w, s], 1).reshape(-1)
print("text", text, "tokens", ids.numel(), "sample s", round(time.time() - t0), flush=True)


def ratios(replace=None):
    with running_blocks(model, bm, replace):
        return {k: round(math.exp(calibrate.mean_nll(model, v, 512) - full[k]), 2)
                for k, v in (("held", held), ("valid", valid))}


print("before", ratios(), flush=True)
t, w = time.process_time(), time.time()
fitted, _, kl = fit_kept_blocks(model, ids, bm, 2, 8, FitSettings(tokens=tokens, epochs=epochs, lr=lr, kl_epochs=kl_epochs, kl_lr=kl_lr, kl_tokens=kl_tokens, kl_rank=kl_rank), log=print, progress=False)
print("fit cpu s", time.process_time() - t, "wall s", time.time() - w, flush=True)
print("after", ratios(fitted), flush=True)
