#!/usr/bin/env python3
"""llama.cpp's side of `deltatune bench decoder --llama-cpp-python PYTHON`: greedy decoding speed
(tokens/s of the decode phase, end of sequence ignored) and prompt-processing speed (tokens/s of
one evaluation of a long prompt) of a GGUF model in llama.cpp through llama-cpp-python, without and
with a LoRA adapter GGUF. Prints one JSON object.

llama-cpp-python is built from PyPI in a throwaway venv (never in CI):
  python3 -m venv VENV && VENV/bin/pip install cmake ninja scikit-build-core
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \\
    VENV/bin/pip install --no-build-isolation "llama-cpp-python[server]==0.3.36"
"""
import argparse
import json
import statistics
import time

import llama_cpp
from llama_cpp import Llama


def decode_speed(llm, ids, tokens):
    """Tokens/s between the first and the last of `tokens` greedy tokens."""
    llm.reset()
    n, first = 0, None
    for _ in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        n += 1
        if n == 1:
            first = time.perf_counter()
        if n == tokens:
            break
    return (tokens - 1) / (time.perf_counter() - first)


def prompt_speed(llm, ids):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    return len(ids) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", help="a LoRA adapter GGUF")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--long-prompt", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    out = {"llama_cpp_python": llama_cpp.__version__}
    variants = [("none", None)] + ([("lora", a.lora)] if a.lora else [])
    for label, lora in variants:
        llm = Llama(model_path=a.model, lora_path=lora, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=1024,
                    n_batch=512, verbose=False, seed=0)
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        short = llm.tokenize(a.prompt.encode(), add_bos=add_bos)
        long = llm.tokenize(a.long_prompt.encode(), add_bos=add_bos)
        decode_speed(llm, short, 4)  # warm-up
        d = [decode_speed(llm, short, a.tokens) for _ in range(a.runs)]
        p = [prompt_speed(llm, long) for _ in range(a.runs)]
        out[label] = {"tokens_per_second": statistics.median(d), "prompt_tokens_per_second": statistics.median(p),
                      "prompt_tokens": len(long)}
        del llm
    print(json.dumps(out))


if __name__ == "__main__":
    main()
