#!/usr/bin/env bash
# The GPU acceptance run: every GPU claim checked in one command (<= 20 min on one H100), results under
# benchmarks/results/<date>-<gpu>/ and a one-screen summary. Needs CUDA; refuses with one line otherwise.
#   bash scripts/gpu_acceptance.sh [--only parity,patched] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # compiled kernels, never the interpreter
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_acceptance.sh: no CUDA GPU here; run it on a CUDA machine (python scripts/gpu_acceptance.py --dry-run shows the plan)" >&2
    exit 2
fi
exec "$PY" scripts/gpu_acceptance.py "$@"
