#!/usr/bin/env bash
# The default recipe on SmolLM2-135M + PTB: `emulate` with no options but the layout, `tune` with its defaults
# (only --steps capped so the data owner sees the demo's 102,400 tokens: 25 steps x 8 x 512), plug in, report.
set -euo pipefail
cd /work/scratch/d && . ./env.sh
export OMP_NUM_THREADS=${THREADS:-2}
PTB=/root/.cache/offsite-ds/ptb
W=${W:-default-recipe}
mkdir -p $W
[ -d $W/bundle ] || /usr/bin/time -f "emulate %e s" offsite-ds emulate $MODEL --layout ${LAYOUT:-2-8-2} --out $W/bundle --no-progress
[ -d $W/adapter ] || /usr/bin/time -f "tune %e s" offsite-ds tune $W/bundle --data $PTB/ptb.train.txt --out $W/adapter --steps 25 --no-progress
[ -d $W/plugged ] || /usr/bin/time -f "plugin %e s" offsite-ds plugin $MODEL $W/adapter --out $W/plugged --check-data $HELD
for split in valid test; do
  offsite-ds report --model $MODEL --bundle $W/bundle --adapter $W/adapter --data $PTB/ptb.$split.txt --seq-len 512 --max-tokens 8192 --json $W/rows-$split.json
done
