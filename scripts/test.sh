#!/usr/bin/env bash
# The full test suite, as CI runs it: fetch the reference model once (the tests never touch the
# network), then every test of the workspace.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh >/dev/null
cargo test --workspace --locked
