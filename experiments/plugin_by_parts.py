"""Which half of the adapter transfers? The full model with only the tuned bottom blocks, only the tuned top blocks,
or all of them plugged in (from a finished round trip's plugged model), PTB perplexity as the demo scores it.

    python experiments/plugin_by_parts.py OUT          # OUT: a demo/compare --out folder holding plugged/
"""
import json
import sys
from pathlib import Path

import torch

from offsite_ds import demo_assets
from offsite_ds.data import load_texts
from offsite_ds.evaluate import perplexity
from offsite_ds.plugin import load_model_dir

out = Path(sys.argv[1])
model, tok = load_model_dir(demo_assets.smollm2_dir())
plugged, _ = load_model_dir(out / "plugged")
texts = {s: load_texts(demo_assets.penn_treebank_file(s)) for s in ("valid", "test")}
original = [{k: v.clone() for k, v in b.state_dict().items()} for b in model.model.layers]
tuned = [b.state_dict() for b in plugged.model.layers]
changed = [i for i in range(len(original))
           if any(not torch.equal(original[i][k], tuned[i][k]) for k in original[i])]
print("blocks the plug-in changed:", changed, flush=True)
half = len(changed) // 2
parts = {"none": [], "bottom": changed[:half], "top": changed[half:], "all": changed}
for name, blocks in parts.items():
    with torch.no_grad():
        for i in range(len(original)):
            model.model.layers[i].load_state_dict(tuned[i] if i in blocks else original[i])
    row = {"plugged": name, "blocks": blocks,
           **{s: round(perplexity(model, tok, t, seq_len=512, max_tokens=8192), 2) for s, t in texts.items()}}
    print(json.dumps(row), flush=True)
