#!/usr/bin/env bash
# usage: BEFORE=WORKTREE [AFTER=TREE] [PYTHON=...] bash experiments/owner_memory_recheck.sh WORK OUT
# peak RSS of emulate --fit --fit-precision bf16 (and auto = fp32 on this CPU) on the synthetic TinyLlama-shaped bf16
# checkpoint of benchmarks/owner_memory.py's builders case (the same command as its manual rows), at BEFORE and AFTER
set -uo pipefail
W=$(realpath -m "${1:?work}"); OUT=$(realpath -m "${2:?out}"); mkdir -p "$W" "$OUT"
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
[ -d "$W/ckpt" ] || PYTHONPATH=. $PY -c "
import sys; sys.argv=['x']; sys.path.insert(0,'benchmarks')
from owner_memory import build_checkpoint, GB
from pathlib import Path
print(build_checkpoint(Path('$W/ckpt'), 22, 2048, 5632, 32000, 32, 4, int(0.6*GB)))"
$PY -c "
from pathlib import Path
Path('$W/public.txt').write_text(' '.join(f'the owner publishes page {i} of its public corpus .' for i in range(4000)))"
m() {  # NAME TREE PRECISION
  /usr/bin/time -v env PYTHONPATH=$2 OMP_NUM_THREADS=2 $PY -m offsite_ds emulate "$W/ckpt" --layout 2-14-2 --out "$W/b-$1" \
    --no-progress --select importance --calib-data "$W/public.txt" --calib-tokens 128 --allow-far --fit --fit-tokens 512 \
    --fit-epochs 1 --fit-precision $3 > "$OUT/$1.time.log" 2>&1
  echo "$1 rc $? $(grep 'Maximum resident' $OUT/$1.time.log) $(grep 'Elapsed' $OUT/$1.time.log)"
  du -sb "$W/b-$1" | cut -f1 > "$OUT/$1.bundle_bytes"; rm -rf "$W/b-$1" "$W/b-$1.checkpoints"
}
/usr/bin/time -v env PYTHONPATH=. $PY -m offsite_ds emulate --help > "$OUT/floor.time.log" 2>&1; echo "floor $(grep 'Maximum resident' $OUT/floor.time.log)"
m bf16-after "${AFTER:-$PWD}" bf16
m bf16-before "${BEFORE:?a worktree of the commit to compare}" bf16
m fp32-after "${AFTER:-$PWD}" fp32
