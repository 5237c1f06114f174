#!/usr/bin/env bash
# The accuracy table of docs/QUANTIZATION.md: SmolLM2-135M-Instruct at every quantization scheme,
# perplexity on tests/data/coriolanus.txt with KL divergence and top-1 agreement against the GGUF
# dequantized to f32, with and without calibration (GPTQ, and smoothing for the A8 schemes).
# Prints one JSON line per plan.
#
#   scripts/quant-accuracy.sh                      # builds release binaries, fetches the model
#   BIN=dir MODEL=file.gguf THREADS=16 scripts/quant-accuracy.sh
#   ONLY="w8a16 w2a16-g32-gptq" scripts/quant-accuracy.sh   # some of the plans below
# The reference plan and the calibration statistics are kept in PLANS_DIR and reused.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
model="${MODEL:-$(scripts/fetch-model.sh | tail -n 1)}"
if [ -n "${BIN:-}" ]; then
    bin="$BIN"
else
    cargo build --release --locked --bin fdc --bin fdrt >&2
    bin=target/release
fi
threads=()
[ -n "${THREADS:-}" ] && threads=(--threads "$THREADS")
dir="${PLANS_DIR:-.cache/accuracy}"
mkdir -p "$dir"
text=tests/data/coriolanus.txt

[ -f "$dir/ref.fdp" ] || "$bin/fdc" compile --quiet --dtype f32 "$model" -o "$dir/ref.fdp" >&2
[ -f "$dir/smollm2.calib" ] ||
    "$bin/fdrt" calibrate "$dir/ref.fdp" --text tests/data/calibration.txt -o "$dir/smollm2.calib" "${threads[@]}" >&2

# name | fdc options
plans=(
    "w4a16|--quant w4a16"
    "w8a16|--quant w8a16"
    "w8a8|--quant w8a8"
    "w4a8|--quant w4a8"
    "fp8|--quant fp8"
    "w8a8-calibrated|--quant w8a8 --calibration $dir/smollm2.calib"
    "w4a8-calibrated|--quant w4a8 --calibration $dir/smollm2.calib"
    "fp8-calibrated|--quant fp8 --calibration $dir/smollm2.calib"
    "w4a16-g64|--quant w4a16 --group-size 64"
    "w4a16-g64-gptq|--quant w4a16 --group-size 64 --calibration $dir/smollm2.calib"
    "w2a16|--quant w2a16"
    "w2a16-g32-gptq|--quant w2a16 --group-size 32 --calibration $dir/smollm2.calib"
    "w2a16-g16-gptq|--quant w2a16 --group-size 16 --calibration $dir/smollm2.calib"
)
for entry in "${plans[@]}"; do
    name="${entry%%|*}"
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        continue
    fi
    # shellcheck disable=SC2086 # the options are words
    "$bin/fdc" compile --quiet ${entry#*|} "$model" -o "$dir/$name.fdp" >&2
    echo "{\"plan\": \"$name\", \"options\": \"${entry#*|}\", \"bytes\": $(stat -c %s "$dir/$name.fdp"), \"eval\": $("$bin/fdrt" eval "$dir/$name.fdp" --text "$text" --reference "$dir/ref.fdp" --json "${threads[@]}")}"
    rm -f "$dir/$name.fdp"
done
