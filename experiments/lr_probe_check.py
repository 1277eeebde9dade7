"""Does the owner's lr probe (offsite_ds.lr_probe) pick the data-owner lr that PTB would pick? Builds `emulate`'s
default 2-8-2 emulator of SmolLM2-135M and the --fit ones, probes each on the owner's public text, and prints the
advice beside the PTB plug-in rows of the lr study (benchmarks/results/2026-12-05-lr-side-by-side-smollm2-cpu).
Resumable: the bundles and each probed lr's result are kept under OUT.

    python experiments/lr_probe_check.py OUT [--public builtin:wikipedia | FILE --heldout FILE] [--steps 50] [--builders importance fit]
"""
import argparse, json, time
from pathlib import Path

from offsite_ds.demo import demo_inputs
from offsite_ds.emulator import DEFAULT_SELECT, PUBLIC_CORPUS, make_bundle
from offsite_ds.fitting import FitSettings
from offsite_ds.lr_probe import PROBE_LRS, ProbeSettings, probe_lr

p = argparse.ArgumentParser()
p.add_argument("out", type=Path)
p.add_argument("--public", default=PUBLIC_CORPUS)
p.add_argument("--heldout", default=None, help="with a --public file: its held-out file")
p.add_argument("--steps", type=int, default=50)
p.add_argument("--lrs", type=float, nargs="*", default=list(PROBE_LRS))
BUILDERS = {"importance": None, "fit": FitSettings(),  # emulate's default; --fit; --fit-align with 48 KL steps
            "fit-align-48": FitSettings(align=True, kl_tokens=32768, kl_epochs=3)}
p.add_argument("--builders", nargs="*", default=["importance", "fit"], choices=list(BUILDERS))
a = p.parse_args()
model_dir, _, _ = demo_inputs()
for builder in a.builders:
    bundle = a.out / f"emulator_{builder}"
    if not (bundle / "offsite.json").is_file():
        t = time.time()
        # as compare-emulators built it (calibrated on builtin:wikipedia: its 32k KL tokens exceed the sample)
        calib = {"calib_data": PUBLIC_CORPUS} if builder == "fit-align-48" else {}
        make_bundle(model_dir, "2-8-2", bundle, select=DEFAULT_SELECT, fit=BUILDERS[builder], **calib)
        print(json.dumps({"builder": builder, "emulate_s": time.time() - t}), flush=True)
    t = time.time()
    advice = probe_lr(model_dir, bundle, a.public, a.heldout, settings=ProbeSettings(lrs=tuple(a.lrs), steps=a.steps),
                      work_dir=a.out / f"probe_{builder}_{Path(str(a.public)).name}_s{a.steps}")
    print(json.dumps({"builder": builder, "public": str(a.public), "probe_s": time.time() - t, "advice": advice}),
          flush=True)
