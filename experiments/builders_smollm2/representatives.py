"""Which block each CRaSh cluster should keep: the adjacent-CKA clusters of SmolLM2-135M's middle at 2-9-2, and
the emulator / full perplexity ratio on the public calibration text for four keep-rules (first, last, and
either with the middle's two ends pinned). Measured figures: benchmarks/results/2026-11-23-e1-builders-smollm2/.

    python experiments/builders_smollm2/representatives.py [--sim-out sim.json]
"""
import argparse
import json
import math

from transformers import AutoTokenizer

from offsite_ds import calibrate, demo_assets
from offsite_ds.runtime import load_model
from offsite_ds.sandwich import merge_adjacent
from offsite_ds.surgery import running_blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sim-out", default="sim.json", help="where the middle's CKA matrix is written")
    args = p.parse_args()
    m = demo_assets.smollm2_dir()
    model = load_model(m)
    tok = AutoTokenizer.from_pretrained(m)
    ids, rec = calibrate.calibration_ids(demo_assets.wikipedia_file("train"), tok, 1024)
    middle = list(range(2, 28))
    reps = calibrate.block_outputs(model, ids, 512, 1024)
    sim = calibrate.cka_matrix(reps[[i + 1 for i in middle]])
    with open(args.sim_out, "w") as f:
        json.dump(sim, f)
    full = calibrate.mean_nll(model, ids, 512)

    def ratio(pos):
        with running_blocks(model, pos):
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


if __name__ == "__main__":
    main()
