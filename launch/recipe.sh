#!/usr/bin/env bash
# The paper's large recipes on the owner's cluster: launch/recipe.sh MODEL STAGE [--dry-run] [-- extra flags]
#
#   MODEL: opt-6.7b (OT 2-18-2), bloom-7b1 (OT 2-12-2), opt-1.3b (2-8-2), gpt2-xl (2-16-2)
#   STAGE: plan | emulate | distill | tune | plugin | ft | ft-lora | eval
#
# Settings come from the environment (see launch/lib.sh): MODELS, WORK, DISTILL_DATA, TUNE_DATA,
# HOSTFILE, NUM_NODES, NUM_GPUS, DS_CONFIG, LAUNCHER_ARGS. --dry-run prints the command instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_common "$@"
set -- "${POSITIONAL[@]+"${POSITIONAL[@]}"}"
if [[ $# -ne 2 ]]; then
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
MODEL="$1" STAGE="$2"

case "$MODEL" in
    opt-6.7b)  LAYOUT="2-18-2"; BATCH=8 ;;
    bloom-7b1) LAYOUT="2-12-2"; BATCH=4 ;;   # 250,880-token vocabulary: the logits dominate activations
    opt-1.3b)  LAYOUT="2-8-2";  BATCH=18 ;;  # the original distillation's per-GPU batch
    gpt2-xl)   LAYOUT="2-16-2"; BATCH=18 ;;
    *) echo "recipe.sh: unknown model '$MODEL' (opt-6.7b, bloom-7b1, opt-1.3b, gpt2-xl)" >&2; exit 2 ;;
esac
MODEL_DIR="${MODEL_DIR:-$MODELS/$MODEL}"
OUT="$WORK/$MODEL"
BUNDLE="$OUT/bundle-$LAYOUT"
DISTILLED="$OUT/bundle-$LAYOUT-distilled"
TUNE_BUNDLE="${TUNE_BUNDLE:-$BUNDLE}"   # the paper's large models used the layer-drop bundle directly
EVAL_FLAGS=()
[[ -n "$EVAL_DATA" ]] && EVAL_FLAGS=(--eval-data "$EVAL_DATA" --eval-every 200)

case "$STAGE" in
    plan)
        gpus="${NUM_GPUS:-8}" nodes="${NUM_NODES:-1}"
        if [[ -z "$NUM_GPUS" && -n "$HOSTFILE" && -f "$HOSTFILE" ]]; then
            gpus="$(grep -v '^\s*#' "$HOSTFILE" | grep -o 'slots=[0-9]*' | head -1 | cut -d= -f2)"
            nodes="${NUM_NODES:-$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")}"
        fi
        single plan "$MODEL" --gpus "$gpus" --nodes "$nodes" --layout "$LAYOUT" --batch-size "$BATCH" ;;
    emulate)   # one process. The paper's uniform layer-drop (streamed, no GPU needed; these models were measured
               # with it). SELECT=importance keeps the blocks that matter on DISTILL_DATA (public; GPU advised) and,
               # as emulate does by default, fits them to the runs they replace (`-- --no-fit`: not).
        if [[ "${SELECT:-uniform}" == uniform ]]; then
            single emulate "$MODEL_DIR" --layout "$LAYOUT" --out "$BUNDLE" --select uniform --no-calib
        else
            single emulate "$MODEL_DIR" --layout "$LAYOUT" --out "$BUNDLE" --select "$SELECT" --calib-data "$DISTILL_DATA"
        fi ;;
    distill)   # ZeRO-3 on the cluster: the original recipe (kd 30, lm 1, lr 1e-4, 2000 warm-up, cosine, 1 epoch)
        launcher distill "$MODEL_DIR" --bundle "$BUNDLE" --data "$DISTILL_DATA" --out "$DISTILLED" \
            --deepspeed "$DS_CONFIG" --kd-weight 30 --lm-weight 1 --lr 1e-4 --warmup 2000 --epochs 1 \
            --seq-len 512 --batch-size "$BATCH" --save-every 500 --gradient-checkpointing "${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"}" ;;
    tune)      # the data owner's side, here on one node: adapter blocks through the emulator
        launcher tune "$TUNE_BUNDLE" --data "$TUNE_DATA" --out "$OUT/adapter" \
            --deepspeed "${TUNE_DS_CONFIG:-$REPO/ds_configs/zero2.json}" --lr 1e-4 --epochs 5 --seq-len 512 \
            --batch-size "$BATCH" --save-every 500 "${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"}" ;;
    plugin)    # one process: validate the returned adapter, plug it into the full model (the bundle it was tuned
               # on is read only when that bundle was aligned: emulate --fit-align)
        single plugin "$MODEL_DIR" "$OUT/adapter" --bundle "$TUNE_BUNDLE" --out "$OUT/plugged" ;;
    ft)        # the paper's FT baseline (lr 2e-5, 3 epochs), all weights, ZeRO-3
        launcher finetune "$MODEL_DIR" --data "$TUNE_DATA" --out "$OUT/ft" --deepspeed "$DS_CONFIG" \
            --lr 2e-5 --epochs 3 --seq-len 512 --batch-size "$BATCH" --save-every 500 --gradient-checkpointing \
            "${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"}" ;;
    ft-lora)   # FT+LoRA: LoRA (r 4, alpha 32, the family's q/v) on every block, ZeRO-3
        launcher finetune "$MODEL_DIR" --lora --data "$TUNE_DATA" --out "$OUT/ft-lora" --deepspeed "$DS_CONFIG" \
            --lr 1e-4 --epochs 3 --seq-len 512 --batch-size "$BATCH" --save-every 500 --gradient-checkpointing \
            "${EVAL_FLAGS[@]+"${EVAL_FLAGS[@]}"}" ;;
    eval)      # perplexity of every model the recipe produced that exists
        for dir in "$MODEL_DIR" "$BUNDLE" "$DISTILLED" "$OUT/plugged" "$OUT/ft" "$OUT/ft-lora"; do
            if [[ "$DRY_RUN" == 1 || -d "$dir" ]]; then
                single eval "$dir" --data "${EVAL_DATA:-$TUNE_DATA}"
            fi
        done ;;
    *) echo "recipe.sh: unknown stage '$STAGE' (plan emulate distill tune plugin ft ft-lora eval)" >&2; exit 2 ;;
esac
