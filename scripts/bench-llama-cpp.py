#!/usr/bin/env python3
"""Baseline numbers from llama.cpp (through llama-cpp-python) for the same GGUF that fdc compiles.

Measures, on the CPU with a fixed thread count:
  * prefill: one evaluation of exactly 512 prompt tokens into an empty cache, best of 3;
  * decode: 128 tokens at batch size 1 after a short prompt, each chosen greedily from the
    previous step's logits and fed back with its own evaluation, best of 3.

The numbers mean something only on an otherwise idle machine: with as many threads as cores,
llama.cpp's OpenMP barriers stall whenever another process takes a core, and throughput drops
several-fold. The load average at the start is reported so that such runs can be spotted.

Install the engine with scripts/setup-bench.sh. The model defaults to the one
scripts/fetch-model.sh puts in the cache.
"""

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

PREFILL_TOKENS = 512
DECODE_TOKENS = 128
REPEATS = 3
CONTEXT = 1024

# Plain prose, tokenized with the model's own tokenizer and repeated until there are enough ids.
PROSE = (
    "The harbour town woke slowly on winter mornings. Fishing boats came back before dawn, "
    "their decks stacked with crates, and the market opened as soon as the first lamps were lit. "
    "Merchants argued about prices while children carried bread from the bakery on the hill. "
    "By noon the fog had lifted, the ferry had left for the islands, and the old lighthouse "
    "keeper was writing the day's weather into a ledger that went back more than a century. "
    "Visitors often asked why the town had never grown into a city. The answer was simple: the "
    "bay was too shallow for large ships, the railway had been built on the other side of the "
    "mountains, and the people who lived there liked it the way it was. "
)
DECODE_PROMPT = "Once upon a time, in a small village by the sea,"


def default_model_path() -> Path:
    repo_root = Path(__file__).resolve().parent.parent
    cache = os.environ.get("FDC_MODEL_CACHE") or str(repo_root / ".cache" / "models")
    return Path(cache) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path(), help="GGUF file")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print only one JSON line")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if not args.model.is_file():
        parser.error(f"model not found: {args.model} (run scripts/fetch-model.sh)")
    return args


def prompt_ids(llm, count: int) -> list:
    ids = llm.tokenize(PROSE.encode("utf-8"), add_bos=False, special=False)
    repeated = []
    while len(repeated) < count:
        repeated.extend(ids)
    return repeated[:count]


def last_logits(llama_cpp, llm, numpy):
    # The context keeps only the last position's logits when logits_all is off; read them
    # directly, since the high-level wrapper no longer copies them after eval.
    pointer = llama_cpp.llama_get_logits(llm.ctx)
    return numpy.ctypeslib.as_array(
        ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),)
    )


def time_prefill(llm, ids: list) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - start)
    return best


def time_decode(llama_cpp, llm, numpy) -> tuple:
    prompt = llm.tokenize(DECODE_PROMPT.encode("utf-8"), add_bos=False, special=False)
    best = float("inf")
    generated = []
    for _ in range(REPEATS):
        llm.reset()
        llm.eval(prompt)
        tokens = []
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(numpy.argmax(last_logits(llama_cpp, llm, numpy)))
            tokens.append(token)
            llm.eval([token])
        best = min(best, time.perf_counter() - start)
        generated = tokens
    return best, generated


def main() -> int:
    args = parse_args()
    load_before = os.getloadavg()[0]
    try:
        import llama_cpp
        import numpy
    except ImportError as err:
        print(f"error: llama_cpp is not importable ({err}); run scripts/setup-bench.sh",
              file=sys.stderr)
        return 1

    llm = llama_cpp.Llama(
        model_path=str(args.model),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=CONTEXT,
        n_batch=PREFILL_TOKENS,
        n_ubatch=PREFILL_TOKENS,
        seed=0,
        verbose=False,
    )
    ids = prompt_ids(llm, PREFILL_TOKENS)
    prefill_s = time_prefill(llm, ids)
    decode_s, generated = time_decode(llama_cpp, llm, numpy)

    result = {
        "engine": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "threads": args.threads,
        "model": args.model.name,
        "prefill_tokens": PREFILL_TOKENS,
        "prefill_tok_s": round(PREFILL_TOKENS / prefill_s, 2),
        "decode_tokens": DECODE_TOKENS,
        "decode_tok_s": round(DECODE_TOKENS / decode_s, 2),
        "loadavg_1m_before": round(load_before, 2),
    }
    if not args.json:
        print(f"model    {args.model}")
        print(f"engine   llama.cpp via {result['version']}, {args.threads} threads "
              f"(1-minute load average before: {load_before:.2f})")
        print(f"prefill  {PREFILL_TOKENS} tokens in {prefill_s * 1e3:.1f} ms "
              f"= {result['prefill_tok_s']} tok/s (best of {REPEATS})")
        print(f"decode   {DECODE_TOKENS} tokens in {decode_s * 1e3:.1f} ms "
              f"= {result['decode_tok_s']} tok/s (best of {REPEATS})")
        text = llm.detokenize(generated).decode("utf-8", errors="replace")
        print(f"greedy continuation of {DECODE_PROMPT!r}: {text[:120]!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
