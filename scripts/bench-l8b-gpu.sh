#!/usr/bin/env bash
# The CUDA decode figures of docs/PERF.md on one GPU, in one run: a Llama-3-8B-shaped model with
# random weights (`fdc synth`), compiled three ways for sm90 (bf16; W4A16 in symmetric groups of
# 128 in the panels of 8 rows; the same with --quant-tiles, the tensor-core layout), then
# `fdrt bench` of each at batch 1, alternating, ROUNDS times. The W4A16 target of the CUDA issue
# is 2.5x the bf16 figure of the same run.
#
#   scripts/bench-l8b-gpu.sh [ROUNDS]        # FDC/FDRT: the binaries (default: target/release)
#
# Needs a GPU, NVRTC for fdc (scripts/fetch-nvrtc.sh) and about 40 GB of disk under WORK
# (default .cache/l8b): the checkpoint and three plans.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
rounds="${1:-2}"
fdc="${FDC:-target/release/fdc}"
fdrt="${FDRT:-target/release/fdrt}"
work="${WORK:-.cache/l8b}"
mkdir -p "$work"
quant=(--target cuda-sm90 --quant w4a16 --group-size 128 --quant-sym --quant-rtn)
[ -f "$work/ckpt/config.json" ] || "$fdc" synth tests/data/configs/llama-3-8b/config.json -o "$work/ckpt" >/dev/null
[ -f "$work/bf16.fdp" ] || "$fdc" compile --quiet --target cuda-sm90 --dtype bf16 "$work/ckpt" -o "$work/bf16.fdp"
[ -f "$work/w4a16.fdp" ] || "$fdc" compile --quiet "${quant[@]}" "$work/ckpt" -o "$work/w4a16.fdp"
[ -f "$work/w4a16-tiles.fdp" ] || "$fdc" compile --quiet "${quant[@]}" --quant-tiles "$work/ckpt" -o "$work/w4a16-tiles.fdp"
for round in $(seq "$rounds"); do
    for plan in bf16 w4a16 w4a16-tiles; do
        printf 'round %s %-12s ' "$round" "$plan"
        "$fdrt" bench "$work/$plan.fdp" --prompt-tokens 128 --decode-tokens 64 --repeats 2 \
            --max-context 1024 --max-batch-tokens 128 2>&1 | grep 'tokens/s' | tail -1
    done
done
