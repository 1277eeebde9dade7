#!/usr/bin/env bash
# The GPU acceptance run as one prepared command for a lent GPU machine (README, "GPU acceptance"): installs
# the carried wheels (.whl/cp<python>/, built by scripts/gpu_wheels.sh) into a temporary site folder,
# makes this checkout importable (PYTHONPATH: no install of our package, the machine's own torch, triton and
# transformers), then runs scripts/gpu_acceptance.py, whose checks fit 530 s and which rewrites
# summary.txt, acceptance.json and results.tar.gz in $OUT after every check.
#   OFFSITE_DS_COMMIT=<sha> bash scripts/gpu_acceptance.sh [--cpu-smoke] [--only a,b] [--dry-run]
# Environment: PYTHON (default python3), OFFSITE_WHEELS (default .whl/cp<XY> for that python), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
fail() {  # one line on stderr, and the same line as $OUT/summary.txt so that even this comes back
    echo "gpu_acceptance.sh: $1" >&2
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && echo "NOT RUN: $1" > "$OUT/summary.txt"; fi
    exit 2
}
tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') \
    || fail "no Python at '$PY'; set PYTHON to the machine's python3"
WHEELS="${OFFSITE_WHEELS:-.whl/$tag}"
ls "$WHEELS"/*.whl >/dev/null 2>&1 \
    || fail "no wheels in $WHEELS; run 'bash scripts/gpu_wheels.sh ${tag:2:1}.${tag:3}' on a networked machine and carry .whl/$tag"
SITE=$(mktemp -d "${TMPDIR:-/tmp}/offsite-site.XXXXXX") || fail "cannot make a folder under ${TMPDIR:-/tmp}; set TMPDIR"
trap 'rm -rf "$SITE" "$SITE.log"' EXIT  # the wheels' site folder (~33 MB) is this run's only
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$WHEELS"/*.whl 2>"$SITE.log" \
    || fail "installing $WHEELS failed: $(tail -n 1 "$SITE.log")"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import offsite_ds.kernels, offsite_ds.manifests, deepspeed" 2>"$SITE.log" \
    || fail "the checkout does not import with $WHEELS: $(tail -n 1 "$SITE.log")"
"$PY" scripts/gpu_acceptance.py "$@"  # not exec: the trap removes the site folder after it
