#!/usr/bin/env bash
# Builds and runs decode_chain_bench.cu on a machine with an H100 (CUDA 13 nvcc, sm_90a).
# Usage, from the repository root: bash kernels/cuda/experiments/run_decode_chain.sh [replays] [persistent]
# (the persistent-kernel variants B to E and nobar run only with the second argument "persistent").
# Writes the build log, the SASS resource report and the run's output to $LOG_DIR (or /tmp).
set -x
set -o pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${LOG_DIR:-/tmp}
bin=/tmp/decode_chain_bench
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
nvcc --version | tail -2
nvcc -O3 -arch=sm_90a -std=c++17 -lineinfo --resource-usage -diag-suppress 128 \
    -o "$bin" "$here/decode_chain_bench.cu" >"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
grep -A3 -E "entry function .*(chain_persistent|q4_pipe|matmul_q4_one'|stream_read)" "$out/build.log" | grep -E "entry|Used|spill"
timeout 240 "$bin" "${1:-9}" ${2:-} 2>&1 | tee "$out/run.log"
