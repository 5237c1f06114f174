#!/usr/bin/env bash
# Mixture-of-experts benchmark: a Qwen3-30B-A3B-shaped model at reduced depth (real hidden size,
# expert count, expert intermediate size, top-k, attention; LAYERS layers, a 32000-token
# vocabulary) with random weights from `fdc synth`, compiled with bf16 weights, then
# runtime/examples/moe_bench.rs: whole-model decode (batch 1 and 32) and prefill, and the MoE
# layer fused against the unfused per-expert graph, with the bandwidth bound. llama.cpp runs
# SmolLM2 in the same run as the machine's reference point (it cannot load the synthetic model).
#
#   scripts/bench-moe.sh             # LAYERS=2 REPEATS=3
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
layers="${LAYERS:-2}"
repeats="${REPEATS:-3}"
bin="${CARGO_TARGET_DIR:-target}/debug"
cargo build --locked -p compiler -p runtime --bin fdc --example moe_bench >&2

dir=".cache/moe/qwen3-30b-a3b-L$layers"
mkdir -p "$dir"
cat > "$dir.config.json" <<JSON
{
  "architectures": ["Qwen3MoeForCausalLM"],
  "model_type": "qwen3_moe",
  "hidden_size": 2048,
  "intermediate_size": 6144,
  "moe_intermediate_size": 768,
  "num_hidden_layers": $layers,
  "num_attention_heads": 32,
  "num_key_value_heads": 4,
  "head_dim": 128,
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "norm_topk_prob": true,
  "decoder_sparse_step": 1,
  "mlp_only_layers": [],
  "vocab_size": 32000,
  "max_position_embeddings": 40960,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "tie_word_embeddings": false,
  "bos_token_id": 1,
  "eos_token_id": 2
}
JSON
if [ ! -f "$dir.fdp" ]; then
    "$bin/fdc" synth "$dir.config.json" -o "$dir" --dtype bf16 >&2
    "$bin/fdc" compile --quiet --target cpu --dtype bf16 "$dir" -o "$dir.fdp" >&2
    rm -rf "$dir"
fi
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads, $bin"
"$bin/examples/moe_bench" "$dir.fdp" "$repeats"
model="$(scripts/fetch-model.sh | tail -n 1)"
python3 scripts/bench-llama-cpp.py --model "$model" --threads "$(nproc)" --json
