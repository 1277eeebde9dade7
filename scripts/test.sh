#!/usr/bin/env bash
# The README's test command: install the toolkit with its test extras (CPU torch pinned), run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt -e ".[dev]"
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
python3 -m pytest -q -n 2 --dist loadfile tests "$@"
