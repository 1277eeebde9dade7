#!/usr/bin/env bash
# emulate on SmolLM2-135M with its defaults (the demo's emulator: importance 2-8-2 + the fit), three ways: uninterrupted;
# stopped by SIGTERM after STOP_S seconds; then the same command again, which goes on from OUT.checkpoints. Checks
# that the two bundles are the same bit for bit and records each run's wall time, peak RSS and log.
#   bash experiments/emulate_resume.sh OUT [STOP_S]     (default 420 s: inside the KL phase on the 2-core CPU)
# The two chains run side by side (OMP_NUM_THREADS=1 each): their times share the CPU.
set -uo pipefail
OUT=${1:?usage: emulate_resume.sh OUT [STOP_S]}
STOP_S=${2:-420}
PY=${PYTHON:-python}
mkdir -p "$OUT"
MODEL=$($PY -c "from offsite_ds import demo_assets; print(demo_assets.smollm2_dir())")
export OMP_NUM_THREADS=1
run() {  # NAME: /usr/bin/time -v of emulate into OUT/NAME's bundle folder
  /usr/bin/time -v "$PY" -m offsite_ds emulate "$MODEL" --layout 2-8-2 --no-progress --out "$OUT/$1" \
    >>"$OUT/$2.log" 2>&1
}
( run reference reference; echo "exit $?" >>"$OUT/reference.log" ) &
ref=$!
( run stopped stopped-1 & pid=$!; sleep "$STOP_S"
  # SIGTERM to the python process only (not /usr/bin/time, which would die at once and leave it saving), then wait
  # for it to save and exit before the folder is listed and the command runs again
  target="^$PY -m offsite_ds emulate $MODEL --layout 2-8-2 --no-progress --out $OUT/stopped"
  pkill -TERM -f "$target"; while pgrep -f "$target" >/dev/null; do sleep 1; done
  wait $pid; echo "exit $?" >>"$OUT/stopped-1.log"
  ls -l "$OUT/stopped.checkpoints" >"$OUT/checkpoints-after-stop.txt" 2>&1
  run stopped stopped-2; echo "exit $?" >>"$OUT/stopped-2.log" ) &
wait $ref $!
$PY - "$OUT" <<'PYEOF' | tee "$OUT/comparison.txt"
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
out = Path(sys.argv[1])
a, b = load_file(out / "reference/model.safetensors"), load_file(out / "stopped/model.safetensors")
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
ma, mb = (json.loads((out / n / "offsite.json").read_text()) for n in ("reference", "stopped"))
print("tensors", len(a), "bit-identical", same)
for key in ("compression", "quality", "block_map"):
    print(key, "equal", ma[key] == mb[key])
print("KL", ma["compression"]["fit"]["kl"], "ratio", ma["quality"]["ratio"])
print("checkpoints folder left", (out / "stopped.checkpoints").exists())
PYEOF
