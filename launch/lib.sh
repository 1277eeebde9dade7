# Shared by the launch scripts: settings from the environment, a dry run that prints instead of running.
# shellcheck shell=bash

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python3}"

# Where things are (override any of them in the environment).
MODELS="${MODELS:-/models}"                 # local HF model directories, e.g. /models/opt-6.7b
WORK="${WORK:-$PWD/runs}"                   # artifacts of the recipes
DISTILL_DATA="${DISTILL_DATA:-/data/pile/00.jsonl}"   # the original distilled on the first Pile chunk
TUNE_DATA="${TUNE_DATA:-/data/downstream/train.jsonl}"
EVAL_DATA="${EVAL_DATA:-}"

# How it is launched.
HOSTFILE="${HOSTFILE:-}"                    # DeepSpeed hostfile (launch/hostfile.example); empty: this host only
NUM_NODES="${NUM_NODES:-}"                  # use the first N hosts of the hostfile
NUM_GPUS="${NUM_GPUS:-}"                    # GPUs per node (default: all the launcher sees / hostfile slots)
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER_ARGS="${LAUNCHER_ARGS:-}"          # extra deepspeed launcher flags, e.g. --no_ssh --node_rank=1
DS_CONFIG="${DS_CONFIG:-$REPO/ds_configs/zero3.json}"
EXTRA_ARGS=()                               # appended to the offsite-ds command (after the recipe's flags)

parse_common() {
    # --dry-run anywhere (even after `--`: offsite-ds has no such flag, so it can only mean "print");
    # everything else after `--` goes to the offsite-ds command.
    local rest=() extra=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --dry-run) DRY_RUN=1 ;;
            --) [[ $extra == 1 ]] && EXTRA_ARGS+=("$1"); extra=1 ;;
            *) if [[ $extra == 1 ]]; then EXTRA_ARGS+=("$1"); else rest+=("$1"); fi ;;
        esac
        shift
    done
    POSITIONAL=("${rest[@]+"${rest[@]}"}")
}

emit() {
    # Print the command (shell-quoted, copy-pasteable) on a dry run, run it otherwise.
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%q ' "$@" | sed 's/ $//'
        printf '\n'
    else
        printf '+ %s\n' "$*" >&2
        "$@"
    fi
}

launcher() {
    # deepspeed [--hostfile H] [--num_nodes N] [--num_gpus G] --master_port P --module offsite_ds <command...>
    local cmd=(deepspeed)
    [[ -n "$HOSTFILE" ]] && cmd+=(--hostfile "$HOSTFILE")
    [[ -n "$NUM_NODES" ]] && cmd+=(--num_nodes "$NUM_NODES")
    [[ -n "$NUM_GPUS" ]] && cmd+=(--num_gpus "$NUM_GPUS")
    cmd+=(--master_port "$MASTER_PORT")
    # shellcheck disable=SC2206
    [[ -n "$LAUNCHER_ARGS" ]] && cmd+=($LAUNCHER_ARGS)
    emit "${cmd[@]}" --module offsite_ds "$@" "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
}

single() {
    # One process (emulate, plugin, eval, plan): no launcher needed.
    emit "$PYTHON" -m offsite_ds "$@" "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
}
