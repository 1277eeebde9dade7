"""Which half of the adapter transfers? The full model with only the tuned bottom blocks, only the tuned top blocks,
or all of them plugged in (from a finished round trip's plugged model), PTB perplexity as the demo scores it; and
how far the tuned bottom blocks move their output on PTB valid (relative error, fitting.relative_error); and the
same parts put into the shipped emulator (OUT/bundle): what each half does where the data owner tuned it.

    python experiments/plugin_by_parts.py OUT          # OUT: a demo/compare --out folder holding plugged/
"""
import json
import sys
from pathlib import Path

import torch

from offsite_ds import demo_assets
from offsite_ds.bundle import load_bundle
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.evaluate import perplexity
from offsite_ds.fitting import relative_error
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
ids = tokenize_corpus(texts["valid"], tok)[:8192].view(-1, 512)
with torch.no_grad():
    entering = [m(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[half]
                for m in (model, plugged)]
print(json.dumps({"bottom_output_shift": round(float(relative_error(entering[1], entering[0])), 4)}), flush=True)
parts = {"none": [], "bottom": changed[:half], "top": changed[half:], "all": changed}
bundle = load_bundle(out / "bundle")
shipped = {i: {k: v.clone() for k, v in bundle.model.model.layers[p].state_dict().items()}
           for p, i in enumerate(bundle.manifest.block_map)}
# into each: per position, the original block it runs and that block's own weights there
for where, target, block_map, own in (("model", model, range(len(original)), dict(enumerate(original))),
                                      ("emulator", bundle.model, bundle.manifest.block_map, shipped)):
    for name, blocks in parts.items():
        with torch.no_grad():
            for p, i in enumerate(block_map):
                target.model.layers[p].load_state_dict(tuned[i] if i in blocks else own[i])
        row = {"into": where, "plugged": name, "blocks": blocks,
               **{s: round(perplexity(target, tok, t, seq_len=512, max_tokens=8192), 2) for s, t in texts.items()}}
        print(json.dumps(row), flush=True)
