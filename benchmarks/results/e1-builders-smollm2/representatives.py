import math, json
from transformers import AutoTokenizer
from offsite_ds import calibrate
from offsite_ds.runtime import load_model
from offsite_ds.sandwich import merge_adjacent
import os
m = os.path.expanduser("~/.cache/offsite-ds/smollm2-135m")
model = load_model(m); tok = AutoTokenizer.from_pretrained(m)
ids, rec = calibrate.calibration_ids(os.path.expanduser("~/.cache/offsite-ds/enwiki/enwiki.train.txt"), tok, 1024)
n = 30; middle = list(range(2, 28))
reps = calibrate.block_outputs(model, ids, 512, 1024)
sim = calibrate.cka_matrix(reps[[i + 1 for i in middle]])
json.dump(sim, open("/tmp/e1/sim.json", "w"))
full = calibrate.mean_nll(model, ids, 512)
def ratio(pos):
    with calibrate.running_blocks(model, pos):
        return math.exp(calibrate.mean_nll(model, ids, 512) - full)
for K in (9,):
    clusters = merge_adjacent(sim, K)
    print("clusters", [[middle[i] for i in c] for c in clusters], flush=True)
    pols = {"first": [c[0] for c in clusters], "last": [c[-1] for c in clusters],
            "ends+first": [clusters[0][0]] + [c[0] for c in clusters[1:-1]] + [clusters[-1][-1]],
            "ends+last": [clusters[0][0]] + [c[-1] for c in clusters[1:-1]] + [clusters[-1][-1]]}
    for name, kept in pols.items():
        kept = [middle[i] for i in kept]
        print(K, name, kept, round(ratio([0, 1] + kept + [28, 29]), 2), flush=True)
