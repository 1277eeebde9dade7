"""The data owner's learning rate, side by side: the plug-in through `emulate`'s default emulator, the ceiling
(the same adapter blocks tuned on the full model) and FT, each at each lr, in one run with one budget (the demo's:
100 steps x 4 x 256 PTB train tokens, full adapter blocks). Resumable: each finished run keeps its result.json.

    python experiments/lr_side_by_side.py OUT --lrs 1e-3 3e-3 --ft-lrs 3e-4 1e-3 [--ceiling-lrs ...] [--fit]

--fit builds the emulator with `emulate --fit` (FitSettings' defaults; --fit-kl-rank R: its low-rank KL phase)
instead of `emulate`'s default; --bundle DIR
tunes through an existing bundle instead.
"""
import argparse, json, time
from pathlib import Path

from transformers import AutoConfig

from offsite_ds.bench.shapes import depth_of_config
from offsite_ds.atomic import cached
from offsite_ds.compare import CEILING, CompareSettings, ceiling_layout, round_trip, run_builder, run_ft
from offsite_ds.demo import demo_inputs
from offsite_ds.demo_assets import wikipedia_file
from offsite_ds.emulator import DEFAULT_SELECT, make_bundle
from offsite_ds.fitting import FitSettings
from offsite_ds.sandwich import Layout

p = argparse.ArgumentParser()
p.add_argument("out", type=Path)
p.add_argument("--lrs", type=float, nargs="*", default=[1e-3, 3e-3])
p.add_argument("--ft-lrs", type=float, nargs="*", default=[3e-4, 1e-3])
p.add_argument("--ceiling-lrs", type=float, nargs="*", default=None, help="default: --lrs")
p.add_argument("--fit", action="store_true")
p.add_argument("--fit-kl-rank", type=int, default=0, help="with --fit: the KL phase's rank (its lr: FitSettings' default)")
p.add_argument("--layout", default="2-8-2")
p.add_argument("--bundle", type=Path, default=None, help="tune through this existing bundle (named in the runs)")
a = p.parse_args()
model_dir, files, _ = demo_inputs()
evals = {"valid": Path(files["valid"]), "test": Path(files["test"])}
train, calib = Path(files["train"]), Path(wikipedia_file("train"))
fit_name = f"fit_r{a.fit_kl_rank}" if a.fit_kl_rank else "fit"
bundle = a.bundle or a.out / (f"emulator_{fit_name}" if a.fit else "emulator")
if a.bundle is None and not (bundle / "offsite.json").is_file():
    t = time.time()
    make_bundle(model_dir, a.layout, bundle, select=DEFAULT_SELECT, progress=False, fit=FitSettings(kl_rank=a.fit_kl_rank) if a.fit else None)
    print(json.dumps({"emulate_s": time.time() - t}), flush=True)
depth = depth_of_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
layout = Layout.parse(a.layout, depth)
tag = f"_{a.bundle.name}" if a.bundle else f"_{fit_name}" if a.fit else ""
runs = [(f"plugin{tag}_lr{lr:g}", lr, lambda o, s: round_trip(model_dir, bundle, train, evals, o, s)) for lr in a.lrs]
runs += [(f"ceiling_lr{lr:g}", lr, lambda o, s: run_builder(CEILING, model_dir, calib, train, evals, o, s,
                                                              ceiling_layout(layout.bottom, layout.top, depth),
                                                              log=lambda *_: None))
         for lr in (a.lrs if a.ceiling_lrs is None else a.ceiling_lrs)]
for name, lr, run in runs:
    s = CompareSettings(lr=lr, progress=False)
    t = time.time()
    r = cached(a.out / name, lambda: run(a.out / name, s))
    print(json.dumps({"run": name, "rows": r["rows"], "wall_s": time.time() - t}), flush=True)
for lr in a.ft_lrs:
    s = CompareSettings(ft_lr=lr, progress=False)
    t = time.time()
    r = cached(a.out / f"ft_lr{lr:g}", lambda: run_ft(model_dir, train, evals, a.out / f"ft_lr{lr:g}", s))
    print(json.dumps({"run": f"ft_lr{lr:g}", "ppl": r["ppl"], "wall_s": time.time() - t}), flush=True)
