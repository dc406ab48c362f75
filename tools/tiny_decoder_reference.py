#!/usr/bin/env python3
"""Small random-weight decoders of the architectures deltatune reads from HF directories (Qwen 2,
Qwen 3, Mistral with a short sliding window), made with transformers from a config, and their
reference outputs, for deltatune's parity tests.

For each architecture the script writes `OUT_DIR/<arch>/config.json` and `model.safetensors`
(2 layers, hidden 32, 4 query heads over 2 key-value heads, vocabulary 256; weights drawn with a
fixed seed and a large spread, biases and norm weights randomised too, so every parameter shows in
the outputs) and one JSON file of references: for each prompt of token ids, per position the
first 48 logits, the argmax and the log-sum-exp over the vocabulary, and the greedy continuation
of 8 tokens.

Run in a throwaway venv (never in CI):
  python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch transformers safetensors
  /tmp/venv-torch/bin/python tools/tiny_decoder_reference.py crates/deltatune/tests/fixtures/tiny
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "qwen2": Qwen2Config(**COMMON),
    "qwen3": Qwen3Config(**COMMON, head_dim=16, attention_bias=False),
    # A window shorter than the prompts, so that the sliding mask matters.
    "mistral": MistralConfig(**COMMON, sliding_window=6),
}
PROMPTS = [
    [1, 17, 200, 33, 5, 99, 250, 7, 7, 7, 64, 128, 3, 45, 46, 47, 48, 255, 10, 11],
    [1, 42, 9, 180, 2, 77],
]
SLICE = 48
GREEDY = 8


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))


def summary(logits):
    return {
        "first": [[round(float(x), 6) for x in row[:SLICE]] for row in logits],
        "argmax": [int(i) for i in logits.argmax(-1)],
        "logsumexp": [round(float(x), 6) for x in torch.logsumexp(logits, -1)],
    }


def main():
    out = Path(sys.argv[1])
    refs = {}
    for k, (arch, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(k)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
        randomise(model, 100 + k)
        d = out / arch
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        (d / "generation_config.json").unlink(missing_ok=True)
        rows = []
        for ids in PROMPTS:
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(x).logits[0]
                gen = model.generate(x, max_new_tokens=GREEDY, do_sample=False, eos_token_id=None, pad_token_id=0,
                                     attention_mask=torch.ones_like(x))
            rows.append({"ids": ids, **summary(logits), "greedy": [int(t) for t in gen[0, len(ids):]]})
        refs[arch] = rows
    import transformers

    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "slice": SLICE}
    (out / "reference.json").write_text(json.dumps({"meta": meta, "models": refs}, indent=None) + "\n")


if __name__ == "__main__":
    main()
