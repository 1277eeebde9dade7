"""A simulated data owner in the KL phase: the owner tunes an emulator's adapter on its own public text with the data
owner's recipe (100 steps of 4 x 256 tokens, full adapter tuning, lr 1e-3, bf16), then builds a new emulator whose
KL phase also matches the full model when both carry that tuned bottom adapter - the directions a data owner's
tuning actually moves the bottom adapter's output (through an emulator, where it learns to repair the emulator),
instead of --fit-kl-perturb's random noise. `offsite.json` then records kl_perturb 1 (the switch this script turns
on; the noise is replaced) and perturb_shift (how far the simulated bottom adapter moved its output).

    python experiments/simulated_tuning_kl.py SIM_BUNDLE OUT [SEED [BUDGET [ALPHA]]]   # 42, default, 1
ALPHA scales the simulated update of the bottom blocks (bottom + ALPHA x (tuned - bottom)): at 1 it moves the bottom
adapter's output on the public text far less than a data owner's tuning moves it on its own text.
Writes OUT/sim-adapter (the simulated tuning), OUT/compare (compare-emulators' round trip at the seed).
"""
import copy
import os
import sys
from dataclasses import replace
from pathlib import Path

import offsite_ds.fitting as fitting
from offsite_ds.adapter_package import load_adapter_package
from offsite_ds.demo import DemoSettings, train_config
from offsite_ds.families import block_prefix, family_by_name
from offsite_ds.roles.tune_adapter import tune

from demo_compare import run_demo_compare

sim_bundle, out = sys.argv[1], Path(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 42
budget = sys.argv[4] if len(sys.argv) > 4 else "default"
alpha = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
cache = Path(os.environ["OFFSITE_DS_CACHE"])
public = cache / "enwiki" / "enwiki.train.txt"
sim = out / "sim-adapter"
if not (sim / "offsite.json").exists():
    s = DemoSettings(lr=1e-3, precision="bf16", seed=0, progress=False)
    tune(sim_bundle, public, sim, mode="full", cfg=train_config(s, out / "sim.checkpoints", s.steps, s.lr, 0),
         seq_len=s.seq_len, max_train_blocks=s.steps * s.batch_size, kernels="off")
package = load_adapter_package(sim)
tensors, family = package.tensors, family_by_name(package.manifest.family)


def perturbed_states(source, stream, bottom, boundaries, scale, seed):
    """fitting.perturbed_states with the simulated tuned bottom blocks in place of the noisy copies."""
    hidden = list(stream.inputs)
    for b in range(bottom):
        block = copy.deepcopy(source.block(b))
        prefix = block_prefix(family, b)
        state = block.state_dict()
        for k, v in tensors.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                state[name] = state[name] + alpha * (v.to(state[name].dtype) - state[name])
        block.load_state_dict(state)
        source.release(b)
        hidden = [stream.run(block.eval(), x, k, b) for k, x in enumerate(hidden)]
    return fitting.teacher_states(source, replace(stream, inputs=hidden), boundaries, start=bottom)


fitting.perturbed_states = perturbed_states
sys.exit(run_demo_compare(cache, budget, seed, out / "compare", "--fit-kl-perturb", "1"))
