"""Width instead of depth at the same emulator size (Minitron's finding, Muralidharan et al. 2024: pruning width and
distilling beats dropping layers): SmolLM2-135M's emulator keeps K > 8 middle blocks, each with its MLP narrowed to
the intermediate channels that matter most on the owner's public calibration text, so the K blocks hold about as
many weights as the paper's 2-8-2 middle (8 whole blocks). Everything else is `emulate`'s default: importance
selection of the K blocks, the block fit and the KL phase (on the narrowed blocks), the guard; then the demo's data
owner (`experiments/round_trip_bundle.py`'s round trip) through the bundle.

A channel's score is its mean |activation| entering down_proj on the calibration tokens times the norm of its
down_proj column (the output it can move). The narrowed blocks are fitted and trained narrow; they are written
zero-padded back to the model's width (a pruned channel's gate and up rows and down column are zero: the same
function) so the bundle stays a plain HF directory and the round trip runs unchanged. The data owner's steps
therefore cost what a 2-K-2 emulator costs, not what the narrow one would: a prototype of the function, not of
the bundle format.

    python experiments/width_prune.py OUT K [WIDTH [LR [SEED]]]   # WIDTH default: same weights as 8 whole blocks
writes OUT/bundle, OUT/rt (the round trip), OUT/width.json (K, width, weights, emulate's seconds, guard, rows).
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from offsite_ds import calibrate, fitting
from offsite_ds.block_stream import StreamedBlocks
from offsite_ds.demo import DemoSettings, round_trip
from offsite_ds.demo_assets import penn_treebank_file, smollm2_dir
from offsite_ds.emulator import PUBLIC_SAMPLE, make_bundle, public_calibration
from offsite_ds.runtime import load_model
from transformers import AutoTokenizer

out, K = Path(sys.argv[1]), int(sys.argv[2])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 7e-4
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 42
md = smollm2_dir()
model = load_model(md).eval()
cfg = model.config
hidden, inter = cfg.hidden_size, cfg.intermediate_size
heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
attn = hidden * heads * hd * 2 + hidden * kv * hd * 2
mlp_per_channel = 3 * hidden
whole = attn + mlp_per_channel * inter
width = int(sys.argv[3]) if len(sys.argv) > 3 else (8 * whole // K - attn) // mlp_per_channel // 32 * 32
assert 0 < width <= inter, width
print(f"K {K}, MLP width {width} of {inter}: {K * (attn + mlp_per_channel * width):,} middle weights against "
      f"8 whole blocks' {8 * whole:,}", flush=True)

# channel scores on the guard's calibration tokens (emulate's default public text, its first 1,024 tokens)
tok = AutoTokenizer.from_pretrained(md, local_files_only=True)
calib, _ = calibrate.calibration_ids(public_calibration(PUBLIC_SAMPLE), tok, calibrate.DEFAULT_CALIB_TOKENS)
layers = model.model.layers
act = [torch.zeros(inter) for _ in layers]


def record(i: int):
    def hook(_module, args):  # returns None: a pre-hook's return value would replace the layer's input
        act[i].add_(args[0].detach().abs().reshape(-1, inter).sum(0))
    return hook


# Until 2026-12-07 the hook was `lambda m, args: act[i].add_(...)`, which returns act[i] and so fed it to down_proj
# in place of the real input: the scores of the runs in 2026-12-07-mlp-width-smollm2-cpu came from that corrupted
# forward pass. `emulate --mlp-width` (offsite_ds.narrow.channel_scores) scores on the model's true forward pass.
hooks = [layer.mlp.down_proj.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
with torch.no_grad():
    calibrate.mean_nll(model, calib, calibrate.calibration_seq_len(model))
for h in hooks:
    h.remove()
keep = {i: torch.sort(torch.topk(act[i] * layer.mlp.down_proj.weight.detach().float().norm(dim=0), width).indices).values
        for i, layer in enumerate(layers)}
del model


def linear(weight: torch.Tensor) -> nn.Linear:
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    m.weight = nn.Parameter(weight.clone())
    return m


def narrowed(block: nn.Module, index: int) -> nn.Module:
    mlp, idx = block.mlp, keep[index]
    mlp.gate_proj, mlp.up_proj = linear(mlp.gate_proj.weight[idx]), linear(mlp.up_proj.weight[idx])
    mlp.down_proj = linear(mlp.down_proj.weight[:, idx])
    return block


def padded(block: nn.Module, index: int) -> nn.Module:
    mlp, idx = block.mlp, keep[index]
    full = lambda w, rows: torch.zeros((inter, w.shape[1]) if rows else (w.shape[0], inter), dtype=w.dtype)  # noqa
    gate, up, down = full(mlp.gate_proj.weight, 1), full(mlp.up_proj.weight, 1), full(mlp.down_proj.weight, 0)
    gate[idx], up[idx], down[:, idx] = mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = linear(gate), linear(up), linear(down)
    return block


own_copy = StreamedBlocks.own_copy
StreamedBlocks.own_copy = lambda self, index: narrowed(own_copy(self, index), index)  # only kept middle blocks
fit_kept_blocks = fitting.fit_kept_blocks


def fit_then_pad(*args, **kwargs):
    fitted, report, kl = fit_kept_blocks(*args, **kwargs)
    return {i: padded(b, i) for i, b in fitted.items()}, report, kl


fitting.fit_kept_blocks = fit_then_pad
out.mkdir(parents=True, exist_ok=True)
t = time.perf_counter()
written = make_bundle(md, f"2-{K}-2", out / "bundle", log=print)
emulate_s = time.perf_counter() - t
manifest = json.loads((out / "bundle" / "offsite.json").read_text())
print(f"emulate {emulate_s:.0f} s; guard {manifest['quality']}", flush=True)

files = {s: penn_treebank_file(s) for s in ("train", "valid", "test")}
settings = DemoSettings(fit=True, lr=lr, precision="fp32", seed=seed, progress=False)
t = time.perf_counter()
result = round_trip(md, out / "bundle", files["train"], {"valid": files["valid"], "test": files["test"]}, out / "rt",
                    settings, log=print)
record = {"K": K, "width": width, "intermediate": inter, "middle_weights": K * (attn + mlp_per_channel * width),
          "eight_whole_blocks": 8 * whole, "emulate_s": emulate_s, "quality": manifest["quality"],
          "block_map": manifest.get("block_map"), "fit": manifest["compression"].get("fit"),
          "rows": result["rows"], "tune_s": result["tune_s"], "evaluate_s": result["evaluate_s"], "lr": lr,
          "seed": seed, "wall_s": time.perf_counter() - t + emulate_s}
(out / "width.json").write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps({k: record[k] for k in ("K", "width", "emulate_s", "quality", "rows")}, indent=1))
