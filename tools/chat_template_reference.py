#!/usr/bin/env python3
"""Chat prompts rendered by transformers' `apply_chat_template` (Jinja2), for deltatune's chat
template tests (minijinja): SmolLM2's template as its GGUF carries it, and deltatune's Gemma
turn template (`GEMMA_TEMPLATE` in crates/deltatune/src/lm/chat.rs, used for Gemma files that
carry no template), on the same conversations, with and without the generation prompt.

Run in a throwaway venv (never in CI):
  VENV/bin/python tools/chat_template_reference.py SMOLLM2_DIR GEMMA3_DIR crates/deltatune/tests/fixtures/chat_templates.json
"""
import json
import re
import sys
from pathlib import Path

from transformers import AutoTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi there  "}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nExplain."},
    ],
]


def gemma_template():
    """GEMMA_TEMPLATE as Rust reads its string literal."""
    src = (Path(__file__).resolve().parent.parent / "crates/deltatune/src/lm/chat.rs").read_text()
    lit = re.search(r'pub const GEMMA_TEMPLATE: &str = "(.*?)";\n', src, re.S).group(1)
    lit = re.sub(r"\\\n\s*", "", lit)
    return lit.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"')


def main():
    smol_dir, gemma_dir, out = sys.argv[1:4]
    smol = AutoTokenizer.from_pretrained(smol_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    gemma = AutoTokenizer.from_pretrained(gemma_dir, gguf_file="gemma-3-270m-q4_k_m.gguf")
    result = {"transformers": __import__("transformers").__version__, "smollm2": [], "gemma3": []}
    for conv in CONVERSATIONS:
        for gen in (True, False):
            result["smollm2"].append(
                {"messages": conv, "add_generation_prompt": gen, "text": smol.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)}
            )
            text = gemma.apply_chat_template(conv, chat_template=gemma_template(), tokenize=False, add_generation_prompt=gen)
            ids = gemma.apply_chat_template(conv, chat_template=gemma_template(), tokenize=True, add_generation_prompt=gen)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            result["gemma3"].append({"messages": conv, "add_generation_prompt": gen, "text": text, "ids": list(ids)})
    with open(out, "w") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
