#!/usr/bin/env bash
# A/B of distillation losses: 16 steps (16,384 public tokens) from the same importance 2-8-2 bundle (T0: the
# curve's t0 folder, e.g. OUT/t0 of `python benchmarks/distill_curve.py --out OUT --points 0`).
# Measured figures: benchmarks/results/2026-11-23-distill-curve-cpu/loss-ab/.
#   T0=curve/t0 bash experiments/distill_loss_ab.sh token logit logitonly lr1e3 tokenlogit
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
T0=${T0:?set T0 to the t0 folder of a distillation curve (its bundle is the starting point)}
export OMP_NUM_THREADS=${THREADS:-2}
run() {  # name, extra args
    local out=ab-$1; shift
    mkdir -p "$out" && [ -e "$out/t0" ] || cp -r "$T0" "$out/t0"
    python3 "$REPO/benchmarks/distill_curve.py" --out "$out" --points 16384 --round-trips "" --no-progress "$@" > "$out.log" 2>&1
    echo "$out: $(python3 -c "import json;r=json.load(open('$out/t16384/result.json'));print(r['emulator'], r['segment_s'])")"
}
for v in "$@"; do
  case $v in
    token) run token --kd-norm token ;;
    logit) run logit --logit-weight 1 ;;
    logitonly) run logitonly --kd-weight 0 --logit-weight 1 ;;
    lr1e3) run lr1e3 --distill-lr 1e-3 ;;
    tokenlogit) run tokenlogit --kd-norm token --logit-weight 1 ;;
  esac
done
