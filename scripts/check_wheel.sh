#!/usr/bin/env bash
# The installed wheel is complete: build it, install it (from the lock) into a new virtual environment
# outside the repository, and run the tiny round trip there - emulate with its defaults (the shipped public
# sample), tune through a stock DeepSpeed config given by name (zero3), plugin, eval - from a folder that
# is not the checkout, so nothing can come from the source tree.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$ROOT"
rm -rf "$ROOT/build"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q -c "$ROOT/constraints.txt" "$WORK"/dist/offsite_ds-*.whl
cd "$WORK"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
PY="$WORK/venv/bin/python"
BIN="$WORK/venv/bin"
"$PY" - <<'PYEOF'
import importlib.util, sys
from pathlib import Path
import offsite_ds, offsite_ds.kernels
from offsite_ds.ds_config import STOCK_CONFIGS, resolve_config_path
site = Path(offsite_ds.__file__).resolve().parents[1]
assert site.name == "site-packages", f"offsite_ds imported from {offsite_ds.__file__}, not the installed wheel"
for name in STOCK_CONFIGS:
    assert resolve_config_path(name).is_relative_to(site), name
spec = importlib.util.find_spec("kernels")
assert spec is None or "offsite" not in str(spec.origin), f"a top-level `kernels` from offsite-ds: {spec.origin}"
assert not (site / "kernels" / "compile_gate.py").exists(), "the wheel installed a top-level kernels/"
from offsite_ds.tiny import save_tiny_model
save_tiny_model("llama", "tiny", n_layers=8)
Path("corpus.txt").write_text("the quick brown fox jumps over the lazy dog . " * 400)
print("installed wheel:", offsite_ds.__file__)
PYEOF
"$BIN/offsite-ds" emulate tiny --layout 2-3-2 --out bundle --no-progress
"$BIN/offsite-ds" tune bundle --data corpus.txt --out adapter --steps 4 --seq-len 32 --batch-size 2 \
    --deepspeed zero3 --torch-adam --no-progress
"$BIN/offsite-ds" plugin tiny adapter --out plugged
"$BIN/offsite-ds" eval plugged --data corpus.txt --seq-len 32
echo "wheel check passed: $(ls "$WORK"/dist)"
