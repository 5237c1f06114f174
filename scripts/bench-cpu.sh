#!/usr/bin/env bash
# CPU benchmark, side by side with llama.cpp in the same run: SmolLM2-135M-Instruct batch-1
# decode and 512-token prefill, fdrt on plans compiled with f32 and bf16 weights, llama.cpp on the
# same Q4_1 GGUF. Prints one JSON line per engine. Needs scripts/setup-bench.sh once.
#
#   scripts/bench-cpu.sh [threads]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
threads="${1:-2}"

model="$(scripts/fetch-model.sh | tail -n 1)"
cargo build --release --locked --bin fdc --bin fdrt >&2
mkdir -p .cache/plans
for dtype in f32 bf16; do
    plan=".cache/plans/smollm2-$dtype.fdp"
    target/release/fdc compile --quiet --target cpu --dtype "$dtype" "$model" -o "$plan" >&2
done

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads"
for round in 1 2; do
    for dtype in f32 bf16; do
        target/release/fdrt bench ".cache/plans/smollm2-$dtype.fdp" --threads "$threads" --json
    done
    python3 scripts/bench-llama-cpp.py --model "$model" --threads "$threads" --json
done
