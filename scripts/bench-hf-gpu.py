#!/usr/bin/env python3
"""The GPU baseline beside `fdrt bench` on a CUDA plan: HF transformers (eager, bf16) on the same
checkpoint fdc compiled, batch-1 prefill and greedy decode tokens/s, plus the device-to-device
copy bandwidth that bounds batch-1 decode (weight bytes / bandwidth is the roofline).

    python3 scripts/bench-hf-gpu.py --model DIR [--prompt-tokens 128] [--decode-tokens 64] [--batch 1]

Prefill is one prompt; decode runs `--batch` sequences of 8 prompt tokens together and counts
the tokens of all of them.

Prints one JSON line. Needs torch with CUDA and transformers (not installed by the project).
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def copy_bandwidth(nbytes=2 << 30, repeats=20):
    """Bytes read plus bytes written per second by a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()

    bandwidth = copy_bandwidth()
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    model = model.cuda().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen).cuda()
    with torch.no_grad():
        model(ids)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        prefill = args.prompt_tokens / (time.perf_counter() - start)
        short = torch.randint(0, vocab, (args.batch, 8), generator=gen).cuda()
        model.generate(short, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(
            short,
            max_new_tokens=args.decode_tokens,
            min_new_tokens=args.decode_tokens,
            do_sample=False,
        )
        torch.cuda.synchronize()
        decode = args.batch * args.decode_tokens / (time.perf_counter() - start)
    print(
        json.dumps(
            {
                "engine": "transformers",
                "version": __import__("transformers").__version__,
                "device": torch.cuda.get_device_name(),
                "prefill_tokens": args.prompt_tokens,
                "prefill_tok_s": round(prefill, 1),
                "decode_tokens": args.decode_tokens,
                "decode_batch": args.batch,
                "decode_tok_s": round(decode, 2),
                "weight_bytes": weight_bytes,
                "copy_bandwidth_bytes_s": round(bandwidth),
                "decode_roofline_tok_s": round(bandwidth / weight_bytes, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
