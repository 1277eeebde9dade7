#!/usr/bin/env bash
# The paper's bloom-7b1 recipe: launch/bloom-7b1.sh STAGE [--dry-run] [-- extra offsite-ds flags]   (see recipe.sh)
exec "$(dirname "${BASH_SOURCE[0]}")/recipe.sh" bloom-7b1 "$@"
