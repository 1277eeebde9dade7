#!/usr/bin/env bash
# Upgrade the lock deliberately: install the newest releases (torch stays the CPU build 2.13.0) into a new
# virtual environment, run the whole suite there, and only if it passes rewrite constraints.txt from what
# was installed. Review `git diff constraints.txt`, then commit it with the suite's result.
#   bash scripts/update_lock.sh            # extra pytest arguments are passed on
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
printf 'torch==2.13.0\n' > "$WORK/torch-only.txt"
cd "$ROOT"
OFFSITE_CONSTRAINTS="$WORK/torch-only.txt" bash scripts/test.sh "$@"
python3 scripts/write_lock.py constraints.txt
echo "constraints.txt rewritten from the environment the suite passed in; review: git diff constraints.txt"
