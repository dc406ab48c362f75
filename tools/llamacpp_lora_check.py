#!/usr/bin/env python3
"""Checks a LoRA exported by `deltatune export --format gguf` in the real llama.cpp: the greedy
continuation (first 16 tokens) of each prompt with the adapter applied by llama.cpp
(llama-cpp-python's `lora_path`) against deltatune's own generation with the unmerged LoRA
(`deltatune generate --delta RUN_DIR --json`). Prints one JSON object with both token lists per
prompt and how many agree.

llama-cpp-python is built from PyPI in a throwaway venv (never in CI), about 11 minutes on 2 cores:
  python3 -m venv VENV && VENV/bin/pip install cmake ninja scikit-build-core
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \\
    VENV/bin/pip install --no-build-isolation llama-cpp-python==0.3.36
Usage:
  VENV/bin/python tools/llamacpp_lora_check.py DELTATUNE_BIN BASE.gguf RUN_DIR ADAPTER.gguf
  VENV/bin/python tools/llamacpp_lora_check.py --merged DELTATUNE_BIN BASE.gguf RUN_DIR MERGED.gguf
With --merged, the last file is a model written by `deltatune merge --format gguf` and llama.cpp
runs it alone (no adapter) against deltatune's unmerged LoRA on the base.
"""
import json
import subprocess
import sys

from llama_cpp import Llama

PROMPTS = [
    "Review: a gorgeous, witty, seductive movie.\nSentiment:",
    "The capital of France is",
    "Once upon a time, in a small village,",
    "Q: What is 12 + 7?\nA:",
]
N = 16


def ours(binary, base, run_dir, prompt):
    out = subprocess.run(
        [binary, "--threads", "2", "generate", "--model", base, "--delta", run_dir, "--prompt", prompt,
         "--max-new-tokens", str(N), "--ignore-eos", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    g = json.loads(out.strip().splitlines()[-1])
    return g["tokens"], g["prompt_tokens"]


def theirs(llm, prompt):
    ids = llm.tokenize(prompt.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true", special=True)
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(t)
        if len(out) == N:
            break
    return out, len(ids)


def main():
    args = sys.argv[1:]
    merged = args[0] == "--merged"
    binary, base, run_dir, adapter = args[1:5] if merged else args[0:4]
    if merged:
        llm = Llama(model_path=adapter, n_threads=2, n_ctx=512, verbose=False, seed=0)
    else:
        llm = Llama(model_path=base, lora_path=adapter, n_threads=2, n_ctx=512, verbose=False, seed=0)
    plain = Llama(model_path=base, n_threads=2, n_ctx=512, verbose=False, seed=0)
    rows = []
    for p in PROMPTS:
        ours_ids, ours_n = ours(binary, base, run_dir, p)
        cpp_ids, cpp_n = theirs(llm, p)
        base_ids, _ = theirs(plain, p)
        rows.append({
            "prompt": p, "prompt_tokens": [ours_n, cpp_n], "deltatune_lora": ours_ids, "llamacpp_lora": cpp_ids,
            "llamacpp_base": base_ids, "same": ours_ids == cpp_ids, "lora_changes_output": cpp_ids != base_ids,
        })
    key = "merged" if merged else "adapter"
    print(json.dumps({"base": base, key: adapter, "agree": sum(r["same"] for r in rows), "of": len(rows), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
