#!/usr/bin/env bash
# Why the tensor-core W4A16 tiles lose to the panels in the 8B decode step (docs/PERF.md, "The
# tensor-core W4A16 matmul in the module"), in one short GPU run:
#   1. kernels/cuda/experiments/narrow_matmul_bench.cu: the module's tile kernel (Q, 16 and 8
#      warps) beside the benchmark's M (activations split beforehand) and the panels' kernel (A),
#      each alone with its weights cold: is the in-kernel split what costs?
#   2. the 8B shape cut to LAYERS layers: panels and tiles, and, when FDC_ALT/FDRT_ALT name a
#      build with another tile block (both `QUANT_TILE_THREADS_ONE` in kernels/src/cuda.rs and
#      `QTILE_WARPS_ONE` in kernels/cuda/quant.cu changed, to 32 * 8 and 8: the kernel and its
#      launch must agree, and `cargo test -p kernels` checks that they do), tiles from that build;
#      decode tok/s with the device time per step (FDRT_GRAPH_TIMES), two rounds.
#   3. with ncu on the PATH: each kind of decode matmul's counters (duration, DRAM throughput,
#      occupancy, stall reasons), panels then tiles, and attention's kernels and the argmax.
# Each part stops at DEADLINE seconds from the start (default 400).
#
#   FDC=... FDRT=... [FDC_ALT=... FDRT_ALT=...] [LAYERS=8] scripts/probe-w4a16-gpu.sh
set -u
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export PATH=/usr/local/cuda/bin:$PATH
start=$(date +%s)
left() { echo $((${DEADLINE:-400} - ($(date +%s) - start))); }
# `timeout` with what is left, or nothing once the deadline has passed (`timeout 0` would mean
# no limit at all).
bounded() {
    local t
    t=$(left)
    [ "$t" -gt 0 ] || { echo "out of time: $*" >&2; return 1; }
    timeout "$t" "$@"
}
stamp() { echo "[$1 at $(($(date +%s) - start)) s]"; }
fdc="${FDC:-target/release/fdc}"
fdrt="${FDRT:-target/release/fdrt}"
layers="${LAYERS:-8}"
work="${WORK:-/tmp/probe-w4a16}"
mkdir -p "$work"
date -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The benchmark builds while the plans are made.
(timeout 200 nvcc -O3 -arch=sm_90a -std=c++17 --resource-usage -diag-suppress 128 \
    -o "$work/narrow" kernels/cuda/experiments/narrow_matmul_bench.cu >"$work/build.log" 2>&1
    echo "nvcc exit $?" >>"$work/build.log") &
mkdir -p "$work/config"
sed "s/\"num_hidden_layers\": 32/\"num_hidden_layers\": $layers/" \
    tests/data/configs/llama-3-8b/config.json >"$work/config/config.json"
quant=(--target cuda-sm90 --quant w4a16 --group-size 128 --quant-sym --quant-rtn)
bounded "$fdc" synth "$work/config/config.json" -o "$work/ckpt" >/dev/null
bounded "$fdc" compile --quiet "${quant[@]}" "$work/ckpt" -o "$work/panels.fdp"
bounded "$fdc" compile --quiet "${quant[@]}" --quant-tiles "$work/ckpt" -o "$work/tiles.fdp"
if [ -n "${FDC_ALT:-}" ]; then
    bounded "$FDC_ALT" compile --quiet "${quant[@]}" --quant-tiles "$work/ckpt" \
        -o "$work/tiles-alt.fdp"
fi
stamp plans
bench() { # plan fdrt
    [ "$(left)" -gt 20 ] || { echo "skipped $1: out of time"; return; }
    printf '%-10s ' "$1"
    FDRT_GRAPH_TIMES=1 timeout 30 "$2" bench "$work/$1.fdp" --prompt-tokens 128 --decode-tokens 64 \
        --repeats 2 --max-context 1024 --max-batch-tokens 128 2>&1 |
        grep -E 'tokens/s|rror|decode graphs' | sed 's/prefill.*decode 64/decode 64/' | tr '\n' ' '
    echo
}
for round in 1 2; do
    bench panels "$fdrt"
    bench tiles "$fdrt"
    [ -z "${FDRT_ALT:-}" ] || bench tiles-alt "$FDRT_ALT"
done
stamp step
wait
grep -E "nvcc exit|error" "$work/build.log" | head -5
[ "$(left)" -gt 10 ] && bounded "$work/narrow"
stamp narrow
command -v ncu >/dev/null || exit 0
profile() { # plan kernel-regex count
    [ "$(left)" -gt 40 ] || { echo "skipped the counters of $1 $2: out of time"; return; }
    timeout 60 ncu --clock-control none --cache-control all --section SpeedOfLight \
        --section Occupancy --section WarpStateStats -k "regex:$2" --launch-count "$3" \
        "$fdrt" bench "$work/$1.fdp" --prompt-tokens 16 --decode-tokens 4 --repeats 1 \
        --max-context 1024 --max-batch-tokens 128 >"$work/ncu.txt" 2>&1
    grep -E "^  [a-z_0-9]+.*\(|Duration|Achieved Occupancy|DRAM Throughput|Stall|Warp Cycles Per Issued" \
        "$work/ncu.txt" | head -40
    stamp "counters of $1 $2"
}
profile panels '^matmul_q4_one' 4
profile tiles '^matmul_q4t_one' 4
profile panels 'argmax|attention|kv_append|silu' 5
