#!/usr/bin/env python3
"""Reference outputs of PyTorch + transformers for the default decoder (SmolLM2-135M-Instruct,
Q4_1 GGUF), written as a small JSON fixture for deltatune's decoder parity tests.

transformers reads the GGUF file by dequantizing every tensor to f32 (and undoing the GGUF
row order of the query/key projections), then runs the model in f32. deltatune keeps the weights
quantized and dequantizes a layer at a time into an f32 matmul, so both sides multiply the same
f32 numbers and differ only by summation order.

Run in a throwaway venv (never in CI):
  python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch transformers gguf
  /tmp/venv-torch/bin/python tools/decoder_reference.py MODEL_DIR crates/deltatune/tests/fixtures/smollm2_reference.json
where MODEL_DIR holds SmolLM2-135M-Instruct.Q4_1.gguf (`deltatune setup --decoder` puts it in the cache).
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "In 2024, there were 1234 apples and 56 oranges.",
    "<|im_start|>user\nWhat is the largest planet?<|im_end|>\n<|im_start|>assistant\n",
    "  Leading spaces, tabs\tand caf\u00e9 \u00fcber \U0001F600 emoji!",
]
VOCAB_SLICE = 64  # logits kept per position: the first ids plus the argmax and logsumexp over all
GREEDY_TOKENS = 16
VIRTUAL_TOKENS = 3


def table(rows, cols, scale, freq, phase):
    """A deterministic test table: scale * sin(freq * i + phase) over the row-major index i,
    computed in f64 and rounded to f32 (the Rust test builds the same one)."""
    i = torch.arange(rows * cols, dtype=torch.float64)
    return (scale * torch.sin(freq * i + phase)).to(torch.float32).reshape(rows, cols)


def summary(logits):
    return {
        "logits_head": [[round(v, 6) for v in row[:VOCAB_SLICE].tolist()] for row in logits],
        "argmax": logits.argmax(-1).tolist(),
        "logsumexp": [round(v, 6) for v in torch.logsumexp(logits, -1).tolist()],
    }


def prompt_learning(model, ids):
    """PEFT prefix tuning and prompt tuning with fixed tables on the first prompt: logits of the
    real positions."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    out = {}
    c = model.config
    for kind, cfg in [
        ("prefix", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)),
        ("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)),
    ]:
        peft_model = get_peft_model(model, cfg)
        emb = peft_model.prompt_encoder["default"].embedding
        if kind == "prefix":
            # PEFT's token_dim under grouped-query attention: num_key_value_heads * head_dim.
            width = c.num_key_value_heads * c.head_dim
            assert emb.weight.shape == (VIRTUAL_TOKENS, c.num_hidden_layers * 2 * width), emb.weight.shape
            t = table(VIRTUAL_TOKENS, c.num_hidden_layers * 2 * width, 0.5, 0.13, 0.0)
        else:
            t = table(VIRTUAL_TOKENS, c.hidden_size, 0.05, 0.37, 1.0)
        with torch.no_grad():
            emb.weight.copy_(t)
            logits = peft_model(input_ids=torch.tensor([ids])).logits[0]
        if kind == "prompt":
            logits = logits[VIRTUAL_TOKENS:]
        out[kind] = {"peft": __import__("peft").__version__, "num_virtual_tokens": VIRTUAL_TOKENS, **summary(logits)}
        model = peft_model.unload() if hasattr(peft_model, "unload") else peft_model.base_model
    return out


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    cases = []
    for p in PROMPTS:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        case = {
            "prompt": p,
            "ids": ids,
            "decoded": tok.decode(ids),
            "logits_head": [[round(v, 6) for v in row[:VOCAB_SLICE].tolist()] for row in logits],
            "argmax": logits.argmax(-1).tolist(),
            "max": [round(v, 6) for v in logits.max(-1).values.tolist()],
            "logsumexp": [round(v, 6) for v in torch.logsumexp(logits, -1).tolist()],
        }
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
        case["greedy"] = gen[0, len(ids):].tolist()
        case["greedy_text"] = tok.decode(case["greedy"])
        cases.append(case)
    deltas = prompt_learning(model, cases[0]["ids"])
    meta = {
        "model": GGUF,
        "deltas": deltas,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "vocab_slice": VOCAB_SLICE,
        "cases": cases,
    }
    with open(out, "w") as f:
        json.dump(meta, f, ensure_ascii=False, indent=0)
        f.write("\n")


if __name__ == "__main__":
    main()
