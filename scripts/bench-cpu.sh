#!/usr/bin/env bash
# CPU benchmark, side by side with llama.cpp in the same run: SmolLM2-135M-Instruct batch-1
# decode and 512-token prefill, fdrt on plans compiled with f32 and bf16 weights and with every
# quantization scheme (--quant), llama.cpp on the same Q4_1 GGUF. Prints one JSON line per engine
# and plan; the rounds alternate the engines. Needs scripts/setup-bench.sh once.
#
#   scripts/bench-cpu.sh [threads]
#   PLANS="bf16 w4a16" ROUNDS=3 scripts/bench-cpu.sh 2   # a subset, more rounds
#   PROFILE=dev scripts/bench-cpu.sh 2                   # binaries of the dev/test profile
#   BIN=dir MODEL=file.gguf TARGET=cpu-avx2 scripts/bench-cpu.sh 2
#                                # prebuilt fdc/fdrt (no cargo), another model path, a fixed ISA
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
threads="${1:-2}"
plans="${PLANS:-f32 bf16 w8a16 w4a16 w2a16 w8a8 w4a8 fp8}"
rounds="${ROUNDS:-2}"

model="${MODEL:-$(scripts/fetch-model.sh | tail -n 1)}"
target="${TARGET:-cpu}"
if [ -n "${BIN:-}" ]; then
    bin="$BIN"
elif [ "${PROFILE:-release}" = dev ]; then
    cargo build --locked --bin fdc --bin fdrt >&2
    bin=target/debug
else
    cargo build --release --locked --bin fdc --bin fdrt >&2
    bin=target/release
fi
mkdir -p .cache/plans
for p in $plans; do
    case "$p" in
        f32 | bf16 | f16) args=(--dtype "$p") ;;
        *) args=(--quant "$p") ;;
    esac
    "$bin/fdc" compile --quiet --target "$target" "${args[@]}" "$model" -o ".cache/plans/smollm2-$p.fdp" >&2
done

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads, $bin"
for round in $(seq "$rounds"); do
    for p in $plans; do
        echo "{\"plan\": \"$p\", \"bench\": $("$bin/fdrt" bench ".cache/plans/smollm2-$p.fdp" --threads "$threads" --json)}"
    done
    python3 scripts/bench-llama-cpp.py --model "$model" --threads "$threads" --json
done
