#!/usr/bin/env python3
"""Reference outputs of PyTorch + transformers for Gemma 3 270M (the Q4_K_M GGUF that
`deltatune setup --decoder gemma3` installs), written as a small JSON fixture for deltatune's
Gemma 3 parity tests: token ids (with the BOS token transformers adds), logits summaries and
16-token greedy continuations.

transformers reads the GGUF by dequantizing every tensor to f32 and builds its tokenizer from
the file's vocabulary; deltatune keeps the weights quantized and multiplies with them
dequantized a layer at a time, so both sides use the same f32 numbers.

Run in a throwaway venv (never in CI):
  python3 -m venv VENV && VENV/bin/pip install torch transformers gguf sentencepiece
  VENV/bin/python tools/gemma3_reference.py MODEL_DIR crates/deltatune/tests/fixtures/gemma3_reference.json
where MODEL_DIR holds gemma-3-270m-q4_k_m.gguf.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "gemma-3-270m-q4_k_m.gguf"
PROMPTS = [
    "The capital of France is",
    "In 2024, there were 1234 apples and 56 oranges.",
    "<start_of_turn>user\nWhat is the largest planet?<end_of_turn>\n<start_of_turn>model\n",
    "  Leading spaces,   runs\tand\n\ntabs caf\u00e9 \u00fcber \U0001F600 emoji!",
]
# Tokenizer-only cases (no model run): more digits, emoji, whitespace and special tokens.
TOKENIZER_ONLY = [
    "3.14159 + 2,718 = 5.85987; 0x1F 007",
    "\U0001F600\U0001F680 \u2764\ufe0f \U0001F1EB\U0001F1F7 \u4f60\u597d\u4e16\u754c \u3053\u3093\u306b\u3061\u306f",
    "a    b\t\tc\n\n\nd     \n  e",
    "<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n<bos><eos><pad>",
    " leading space and trailing  ",
    "",
]
VOCAB_SLICE = 64
TOPK = 8
GREEDY_TOKENS = 16


def summary(logits):
    top = logits.topk(TOPK, -1)
    return {
        # The first ids are control tokens; the slice from 1000 covers ordinary pieces.
        "logits_head": [[round(v, 6) for v in row[1000 : 1000 + VOCAB_SLICE].tolist()] for row in logits],
        "argmax": logits.argmax(-1).tolist(),
        "logsumexp": [round(v, 6) for v in torch.logsumexp(logits, -1).tolist()],
        "top_ids": top.indices.tolist(),
        "top_logits": [[round(v, 6) for v in row] for row in top.values.tolist()],
    }


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    cases = []
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            gen = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
        case = {"prompt": p, "ids": ids, "decoded": tok.decode(ids), **summary(logits)}
        case["greedy"] = gen[0, len(ids) :].tolist()
        case["greedy_text"] = tok.decode(case["greedy"])
        cases.append(case)
    tokenizer_only = []
    for p in TOKENIZER_ONLY:
        ids = tok(p)["input_ids"]
        tokenizer_only.append({"prompt": p, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    meta = {
        "model": GGUF,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "vocab_slice_start": 1000,
        "vocab_slice": VOCAB_SLICE,
        "cases": cases,
        "tokenizer_only": tokenizer_only,
    }
    with open(out, "w") as f:
        json.dump(meta, f, ensure_ascii=False, indent=0)
        f.write("\n")


if __name__ == "__main__":
    main()
