#!/usr/bin/env bash
# The whole user journey on the default model, from a fresh checkout: fetch SmolLM2-135M-Instruct
# (Q4_1 GGUF), build fdc and fdrt, compile the model into a plan, inspect it, and answer a chat
# prompt with it.
#
#   scripts/quickstart.sh ["your question"]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
prompt="${1:-What is the capital of France?}"

model="$(scripts/fetch-model.sh | tail -n 1)"
cargo build --release --locked --bin fdc --bin fdrt
mkdir -p .cache/plans
plan=.cache/plans/smollm2.fdp
target/release/fdc compile --target cpu "$model" -o "$plan"
target/release/fdc inspect "$plan"
echo
echo "> $prompt"
target/release/fdrt generate "$plan" --chat --prompt "$prompt"
