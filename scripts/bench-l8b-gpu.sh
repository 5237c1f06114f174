#!/usr/bin/env bash
# The CUDA decode figures of docs/PERF.md on one GPU, in one run: a Llama-3-8B-shaped model with
# random weights (`fdc synth`), compiled three ways for sm90 (bf16; W4A16 in symmetric groups of
# 128 in the panels of 8 rows; the same with --quant-tiles, the tensor-core layout), then
# `fdrt bench` of each at batch 1, alternating, ROUNDS times, each with decode attention split
# over three kernels and in one launch (FDRT_DECODE_ATTENTION), with the device time of a decode
# step beside each figure (FDRT_GRAPH_TIMES). The W4A16 target of the CUDA issue is 2.5x the
# bf16 figure of the same run.
#
#   scripts/bench-l8b-gpu.sh [ROUNDS]        # FDC/FDRT: the binaries (default: target/release)
#   LAYERS=8 scripts/bench-l8b-gpu.sh 1      # the same shape cut to 8 layers: a quick A/B
#
# Needs a GPU, NVRTC for fdc (scripts/fetch-nvrtc.sh) and about 40 GB of disk under WORK
# (default .cache/l8b, or .cache/l8b-LAYERS): the checkpoint and three plans.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
rounds="${1:-2}"
layers="${LAYERS:-32}"
fdc="${FDC:-target/release/fdc}"
fdrt="${FDRT:-target/release/fdrt}"
work="${WORK:-.cache/l8b$([ "$layers" = 32 ] || echo "-$layers")}"
mkdir -p "$work"
config=tests/data/configs/llama-3-8b/config.json
if [ "$layers" != 32 ]; then
    mkdir -p "$work/config"
    sed "s/\"num_hidden_layers\": 32/\"num_hidden_layers\": $layers/" "$config" >"$work/config/config.json"
    config="$work/config/config.json"
fi
quant=(--target cuda-sm90 --quant w4a16 --group-size 128 --quant-sym --quant-rtn)
[ -f "$work/ckpt/config.json" ] || "$fdc" synth "$config" -o "$work/ckpt" >/dev/null
[ -f "$work/bf16.fdp" ] || "$fdc" compile --quiet --target cuda-sm90 --dtype bf16 "$work/ckpt" -o "$work/bf16.fdp"
[ -f "$work/w4a16.fdp" ] || "$fdc" compile --quiet "${quant[@]}" "$work/ckpt" -o "$work/w4a16.fdp"
[ -f "$work/w4a16-tiles.fdp" ] || "$fdc" compile --quiet "${quant[@]}" --quant-tiles "$work/ckpt" -o "$work/w4a16-tiles.fdp"
for round in $(seq "$rounds"); do
    for plan in bf16 w4a16 w4a16-tiles; do
        for attention in split one-launch; do
            printf 'round %s %-12s %-11s ' "$round" "$plan" "$attention"
            FDRT_GRAPH_TIMES=1 FDRT_DECODE_ATTENTION=$attention "$fdrt" bench "$work/$plan.fdp" \
                --prompt-tokens 128 --decode-tokens 64 --repeats 2 --max-context 1024 \
                --max-batch-tokens 128 2>&1 | grep -E 'tokens/s|decode graphs' | tr '\n' ' '
            echo
        done
    done
done
