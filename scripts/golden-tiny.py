#!/usr/bin/env python3
"""Writes tiny random-weight checkpoints and their HF transformers reference outputs.

Each case is a real checkpoint directory as `save_pretrained` writes it, plus the reference,
in the format of the other goldens under tests/golden/tiny (see tests/golden/README.md):

- config.json, model.safetensors: float32 weights, every tensor randomized (matrices normal with
  standard deviation 1/sqrt(columns), norms uniform in [0.5, 1.5], biases nonzero);
- golden.safetensors: input_ids (i64, 40 tokens) and logits (f32, [40, vocab]), row t the
  next-token logits after input_ids[..=t], computed by transformers in float64;
- golden.json: input_ids, prompt_ids (the first 12) and greedy_ids (prompt + 20 greedy tokens,
  float64, EOS suppressed until the last token).

The cases are the rope scalings the shared goldens lack:
- deepseek_v3_yarn: the tiny DeepSeek-V3 with YaRN scaling (factor 4 over an original context
  of 32, explicit beta_fast / beta_slow, and mscale != mscale_all_dim, so both the attention
  factor on the rope parts and the softmax scale's mscale_all_dim correction are exercised);
- qwen2_yarn: a Qwen2 with YaRN at its defaults (plain attention, as Qwen2.5 uses it).

Usage (needs torch, transformers and safetensors; nothing else of the project):
    python3 scripts/golden-tiny.py OUT_DIR [CASE ...]
Writes OUT_DIR/CASE/ for each case (all of them by default). The checked-in goldens were
written with torch 2.15 and transformers 5.23 on the CPU; the seed makes reruns identical.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

SEED = 7
N_TOKENS = 40
N_PROMPT = 12
N_NEW = 20

DEEPSEEK_V3_YARN = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "rope_interleave": True,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        # Narrower than the defaults (32, 1) so that with 4 rope frequencies the ramp has a
        # dimension strictly between kept and divided.
        "beta_fast": 4.0,
        "beta_slow": 0.5,
        "mscale": 2.0,
        "mscale_all_dim": 0.5,
    },
}

QWEN2_YARN = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}

CASES = {"deepseek_v3_yarn": DEEPSEEK_V3_YARN, "qwen2_yarn": QWEN2_YARN}


def randomize(model, generator):
    """Every parameter and persistent buffer randomized, norms near 1, biases nonzero."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if "norm" in name:
                value = torch.rand(tensor.shape, generator=generator) + 0.5
            elif tensor.dim() == 1:
                value = (torch.rand(tensor.shape, generator=generator) - 0.5) * 0.16
            else:
                std = tensor.shape[-1] ** -0.5
                value = torch.randn(tensor.shape, generator=generator) * std
            tensor.copy_(value.to(tensor.dtype))


def write_case(name, config_dict, out):
    generator = torch.Generator().manual_seed(SEED)
    config = AutoConfig.for_model(**config_dict)
    # The eager attention and experts: the fused ones refuse float64.
    model = AutoModelForCausalLM.from_config(
        config,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    randomize(model, generator)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)

    vocab = config.vocab_size
    input_ids = torch.randint(3, vocab, (N_TOKENS,), generator=generator)
    model64 = model.to(torch.float64)
    with torch.no_grad():
        logits = model64(input_ids[None, :]).logits[0]
        prompt = input_ids[None, :N_PROMPT]
        greedy = model64.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            pad_token_id=0,
        )[0]
    save_file(
        {"input_ids": input_ids.to(torch.int64), "logits": logits.to(torch.float32).contiguous()},
        str(out / "golden.safetensors"),
    )
    golden = {
        "input_ids": input_ids.tolist(),
        "prompt_ids": input_ids[:N_PROMPT].tolist(),
        "greedy_ids": greedy.tolist(),
    }
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"{name}: {out} (logits max |x| {logits.abs().max():.3f}, greedy {greedy.tolist()[N_PROMPT:]})")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    for name in names:
        if name not in CASES:
            sys.exit(f"unknown case {name}; cases: {', '.join(CASES)}")
        write_case(name, CASES[name], out / name)


if __name__ == "__main__":
    main()
