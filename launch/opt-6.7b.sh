#!/usr/bin/env bash
# The paper's opt-6.7b recipe: launch/opt-6.7b.sh STAGE [--dry-run] [-- extra offsite-ds flags]   (see recipe.sh)
exec "$(dirname "${BASH_SOURCE[0]}")/recipe.sh" opt-6.7b "$@"
