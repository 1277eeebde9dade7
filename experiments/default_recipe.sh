#!/usr/bin/env bash
# The default recipe on SmolLM2-135M + PTB: `emulate` with no options but the layout, `tune` with its defaults
# (only --steps capped so the data owner sees the demo's 102,400 tokens: 25 steps x 8 x 512), plug in, report.
# Measured figures: benchmarks/results/2026-11-23-default-recipe-cpu/.
#   bash experiments/default_recipe.sh [WORK_DIR]      (LAYOUT=2-8-2, THREADS=2 by default)
set -euo pipefail
export OMP_NUM_THREADS=${THREADS:-2}
W=${1:-default-recipe}
asset() { python3 -c "from offsite_ds import demo_assets as d; print(d.$1)"; }
MODEL=$(asset "smollm2_dir()")
HELD=$(asset "wikipedia_file('heldout')")  # the owner's public held-out text
mkdir -p "$W"
[ -d "$W/bundle" ] || /usr/bin/time -f "emulate %e s" offsite-ds emulate "$MODEL" --layout "${LAYOUT:-2-8-2}" --out "$W/bundle" --no-progress
[ -d "$W/adapter" ] || /usr/bin/time -f "tune %e s" offsite-ds tune "$W/bundle" --data "$(asset "penn_treebank_file('train')")" --out "$W/adapter" --steps 25 --no-progress
[ -d "$W/plugged" ] || /usr/bin/time -f "plugin %e s" offsite-ds plugin "$MODEL" "$W/adapter" --out "$W/plugged" --check-data "$HELD"
for split in valid test; do
  offsite-ds report --model "$MODEL" --bundle "$W/bundle" --adapter "$W/adapter" --data "$(asset "penn_treebank_file('$split')")" --seq-len 512 --max-tokens 8192 --json "$W/rows-$split.json"
done
