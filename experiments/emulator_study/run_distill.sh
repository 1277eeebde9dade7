#!/usr/bin/env bash
# Distil the uniform 2-8-2 emulator of SmolLM2-135M on the owner's PUBLIC corpus (Wikipedia sample in gensim),
# one process, no DeepSpeed, as run for issue 12 (see README.md here for the machine load and the timings).
set -euo pipefail
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
RUNS=${RUNS:-runs}  # bundles and the distilled bundle go here
MODEL=$(python -c "from offsite_ds.demo_assets import smollm2_dir; print(smollm2_dir())")
TRAIN=$(python -c "from offsite_ds.demo_assets import wikipedia_file; print(wikipedia_file('train'))")
HELD=$(python -c "from offsite_ds.demo_assets import wikipedia_file; print(wikipedia_file('heldout'))")
[ -d "$RUNS/uniform-2-8-2" ] || offsite-ds emulate "$MODEL" --layout 2-8-2 --out "$RUNS/uniform-2-8-2"
/usr/bin/time -v offsite-ds distill "$MODEL" --bundle "$RUNS/uniform-2-8-2" --data "$TRAIN" \
    --eval-data "$HELD" --max-eval-blocks 4 --out "$RUNS/uniform-2-8-2-distilled" \
    --steps "${STEPS:-50}" --lr "${LR:-5e-4}" --warmup 3 --batch-size 2 --seq-len 512 --eval-every 10 \
    --kd-weight "${KD:-30}" --lm-weight 1 --save-every 10 --log-every 1 --no-progress \
    --summary-json "$RUNS/uniform-2-8-2-distilled.summary.json"
