#!/usr/bin/env bash
# The long fuzz run: every target for SECONDS (default 3600) each, growing fuzz/corpus/. Record
# the table it prints in docs/RELIABILITY.md, with the date and the machine.
#
#   scripts/fuzz-long.sh [SECONDS] [TARGET...]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${1:-3600}"
shift $(( $# > 0 ? 1 : 0 ))
exec scripts/fuzz.sh "$seconds" "$@"
