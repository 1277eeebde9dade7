"""The data owner's cost through a bundle, paired on one machine: 12 tuning steps of the demo's batch (4 x 256 PTB
train tokens, full adapter tuning, fp32; the bundle's load included), then the full model's perplexity on 8,192
PTB valid tokens as a yardstick of the machine's speed in that hour.

    python experiments/tune_step_cost.py BUNDLE MODEL TRAIN VALID OUT
prints one JSON line. PADDED=1 runs an --mlp-width bundle's middle blocks at the full width, as stored (what the
data owner paid before load_bundle dropped the zero channels); THP_MEM_ALLOC_ENABLE=1 is torch's huge-page
allocator (measured: no steady win).
"""
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import offsite_ds.bundle
from offsite_ds.calibrate import mean_nll
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.roles.tune_adapter import tune
from offsite_ds.runtime import load_model
from offsite_ds.train import TrainConfig

bundle, model_dir, train, valid, out = sys.argv[1:6]
if os.environ.get("PADDED"):
    offsite_ds.bundle._narrow_middle = lambda *args: None
t = time.perf_counter()
tune(bundle, train, Path(out) / "adapter", mode="full", seq_len=256, max_train_blocks=48,
     cfg=TrainConfig(steps=12, lr=7e-4, warmup_steps=2, batch_size=4, progress=False, device="cpu", precision="fp32",
                     checkpoint_dir=str(Path(out) / "checkpoints")), kernels="off")
tune_s = time.perf_counter() - t
model = load_model(model_dir)
ids = tokenize_corpus(load_texts(valid), AutoTokenizer.from_pretrained(model_dir))[:8192]
t = time.perf_counter()
nll = mean_nll(model, ids, 512)
eval_s = time.perf_counter() - t
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"padded": bool(os.environ.get("PADDED")), "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                  "tune12_s": round(tune_s, 1), "eval_s": round(eval_s, 1), "nll": nll, "user_s": usage.ru_utime,
                  "sys_s": usage.ru_stime, "minflt": usage.ru_minflt, "threads": torch.get_num_threads()}))
