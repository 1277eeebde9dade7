#!/usr/bin/env bash
# The Python packages the lent GPU machine lacks, as wheels it can install offline (it has no network).
# The machine (docs: the device tool's KINDS.md) has Python 3.12 with torch, triton, transformers, peft,
# accelerate, safetensors, tokenizers, numpy, msgpack, psutil, ninja, py-cpuinfo, nvidia-ml-py, einops, tqdm;
# it lacks these, so they travel with the checkout (the `run` tool's `carry`, README's GPU section):
#   pydantic (+ pydantic-core, typing-extensions, annotated-types, typing-inspection): imported by our manifests
#   deepspeed (+ hjson): built once here into a pure-Python wheel (DS_BUILD_OPS=0: no ops compiled, no torch)
#   liger-kernel, cut-cross-entropy: the kernel baselines
# Versions come from constraints.txt (the lock) where it pins them; the two baselines are pinned below.
#
#   bash scripts/gpu_wheels.sh          # -> .whl/cp312/  (the GPU machine's CPython 3.12, manylinux x86-64)
#   bash scripts/gpu_wheels.sh 3.11     # -> .whl/cp311/  (this machine's Python: the CPU simulation's wheels)
# .whl/ is git-ignored; scripts/gpu_acceptance.sh installs .whl/cp<its python>/ with --no-index --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PYVER="${1:-3.12}"
case "$PYVER" in 3.[0-9]|3.[0-9][0-9]) ;; *) echo "gpu_wheels.sh: '$PYVER' is not a Python version; give e.g. 3.12" >&2; exit 2 ;; esac
DEST=".whl/cp${PYVER/./}"
BASELINES=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
LOCKED=(pydantic pydantic-core typing-extensions annotated-types typing-inspection hjson)
DEEPSPEED="deepspeed==$(sed -n 's/^deepspeed==//Ip' constraints.txt)"

pins=()
for name in "${LOCKED[@]}"; do
    version=$(sed -n "s/^${name}==//Ip" constraints.txt)
    [ -n "$version" ] || { echo "gpu_wheels.sh: constraints.txt pins no $name; run scripts/update_lock.sh" >&2; exit 2; }
    pins+=("$name==$version")
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
# one call: pip matches each --platform tag exactly, so name every manylinux level the wheels use
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$tmp" "${pins[@]}" "${BASELINES[@]}"
# deepspeed ships only as an sdist: build it once (a pure-Python wheel serves every CPython 3)
ds_cache=.whl/deepspeed
if ! ls "$ds_cache"/deepspeed-*-py3-none-any.whl >/dev/null 2>&1; then
    mkdir -p "$ds_cache"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary deepspeed -w "$ds_cache" "$DEEPSPEED"
fi
cp "$ds_cache"/deepspeed-*-py3-none-any.whl "$tmp"/
if unzip -l "$tmp"/deepspeed-*.whl | grep -q '\.so$'; then
    echo "gpu_wheels.sh: the deepspeed wheel holds compiled ops; delete $ds_cache and rerun" >&2; exit 1
fi
if ls "$tmp" | grep -qi '^torch-'; then echo "gpu_wheels.sh: a torch wheel slipped in; the machine has its own" >&2; exit 1; fi
rm -rf "$DEST.new" && mv "$tmp" "$DEST.new" && trap - EXIT
rm -rf "$DEST" && mv "$DEST.new" "$DEST"
echo "$DEST: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1)"
ls "$DEST"
